// Padding-free encoder attention over a packed variable-length batch (ByteTransformer style).
//
// The batch's real tokens are packed back to back (padding removed); sequence i owns the tokens
// cu_seqlens[i] … cu_seqlens[i+1] − 1. Every token attends, bidirectionally, to the tokens of its
// own sequence only: o_t = softmax(q_t·K_iᵀ·scale)·V_i. No padded token is ever read, so the cost
// is Σ_i L_i² rather than batch·max(L)². One warp per (query token, head), with the online softmax.
#include "warp_attention.cuh"

namespace {

constexpr int kWarps = 4;

template <typename T>
__global__ void packed_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const int* __restrict__ cu_seqlens, T* __restrict__ out, int heads,
                                        int head_dim, int64_t token_stride, float scale) {
  const int sequence = blockIdx.z, head = blockIdx.y;
  const int begin = cu_seqlens[sequence], end = cu_seqlens[sequence + 1];
  const int token = begin + blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (token >= end) return;
  const int64_t head_offset = static_cast<int64_t>(head) * head_dim;
  float query[xopt::kDimsPerLane];
  xopt::load_query(query, q + token * token_stride + head_offset, head_dim, scale);
  xopt::WarpSoftmaxState state;
  xopt::attend_run(state, query, k + head_offset, v + head_offset, token_stride, static_cast<const T*>(nullptr),
                   begin, end, 1, head_dim);
  const int lane = threadIdx.x & 31;
  T* row = out + (static_cast<int64_t>(token) * heads) * head_dim + head_offset;
#pragma unroll
  for (int i = 0; i < xopt::kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) row[d] = xopt::from_float<T>(state.output[i] / state.sum);
  }
}

}  // namespace

// q, k, v: token t's head h at base + t·token_stride + h·head_dim; cu_seqlens: int32 [sequences + 1];
// out: [tokens, heads, head_dim]; longest: the longest sequence (sizes the grid).
extern "C" int xopt_packed_attention(int dtype, const void* q, const void* k, const void* v, const int* cu_seqlens,
                                     void* out, int sequences, int longest, int heads, int head_dim,
                                     int64_t token_stride, float scale, cudaStream_t stream) {
  if (sequences <= 0 || longest <= 0 || heads <= 0 || head_dim <= 0 || head_dim > xopt::kMaxHeadDim)
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid((longest + kWarps - 1) / kWarps, heads, sequences);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    packed_attention_kernel<T><<<grid, 32 * kWarps, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cu_seqlens,
        static_cast<T*>(out), heads, head_dim, token_stride, scale);
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}
