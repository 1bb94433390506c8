// Decode attention with the KV length split across thread blocks (flash-decoding / Lean-Attention).
//
// One new query token per sequence attends to its cache: o = softmax(q·Kᵀ·scale + bias)·V over the
// first length[b] keys. A single block per (sequence, head) leaves most of the GPU idle at batch 1,
// so the keys are cut into `splits` runs, one block each (phase 1), each block's four warps
// interleaving over its run with the online softmax and merging in shared memory into a partial
// (m_s, l_s, o_s). Phase 2 combines the runs exactly:
//   M = max_s m_s,   L = Σ_s l_s·exp(m_s − M),   o = Σ_s o_s·exp(m_s − M) / L.
// Grouped-query attention: query head h reads KV head h / (heads / kv_heads).
#include "warp_attention.cuh"

namespace {

constexpr int kWarps = 4;

template <typename T>
__global__ void decode_partial_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                                      const T* __restrict__ v_cache, const int* __restrict__ lengths,
                                      const T* __restrict__ bias, float* __restrict__ workspace, int heads,
                                      int kv_heads, int head_dim, int capacity, int64_t q_batch_stride,
                                      int64_t bias_batch_stride, float scale) {
  const int split = blockIdx.x, head = blockIdx.y, batch = blockIdx.z, splits = gridDim.x;
  const int warp = threadIdx.x >> 5;
  const int length = lengths[batch];
  const int run = (length + splits - 1) / splits;
  const int begin = split * run;
  const int end = min(length, begin + run);
  const int kv_head = head / (heads / kv_heads);
  const int64_t cache_offset = (static_cast<int64_t>(batch) * kv_heads + kv_head) * capacity * head_dim;

  float query[xopt::kDimsPerLane];
  xopt::load_query(query, q + batch * q_batch_stride + static_cast<int64_t>(head) * head_dim, head_dim, scale);
  xopt::WarpSoftmaxState state;
  xopt::attend_run(state, query, k_cache + cache_offset, v_cache + cache_offset, head_dim,
                   bias != nullptr ? bias + batch * bias_batch_stride : nullptr, begin + warp, end, kWarps,
                   head_dim);

  // merge the warps: (m, l, o[D]) of each in shared memory, then one thread per dimension
  __shared__ float maxima[kWarps], sums[kWarps];
  __shared__ float outputs[kWarps][xopt::kMaxHeadDim];
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    maxima[warp] = state.maximum;
    sums[warp] = state.sum;
  }
#pragma unroll
  for (int i = 0; i < xopt::kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) outputs[warp][d] = state.output[i];
  }
  __syncthreads();
  float maximum = -INFINITY;
  for (int w = 0; w < kWarps; ++w) maximum = fmaxf(maximum, maxima[w]);
  float* partial = workspace + ((static_cast<int64_t>(batch) * heads + head) * splits + split) * (head_dim + 2);
  for (int d = threadIdx.x; d < head_dim + 1; d += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (maxima[w] == -INFINITY) continue;
      total += (d < head_dim ? outputs[w][d] : sums[w]) * __expf(maxima[w] - maximum);
    }
    partial[d < head_dim ? 2 + d : 1] = total;
  }
  if (threadIdx.x == 0) partial[0] = maximum;
}

template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ workspace, T* __restrict__ out, int heads,
                                      int head_dim, int splits) {
  const int head = blockIdx.x, batch = blockIdx.y;
  const float* partials = workspace + (static_cast<int64_t>(batch) * heads + head) * splits * (head_dim + 2);
  float maximum = -INFINITY;
  for (int s = 0; s < splits; ++s) maximum = fmaxf(maximum, partials[s * (head_dim + 2)]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float numerator = 0.0f, denominator = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* partial = partials + s * (head_dim + 2);
      if (partial[0] == -INFINITY) continue;
      const float weight = __expf(partial[0] - maximum);
      numerator += partial[2 + d] * weight;
      denominator += partial[1] * weight;
    }
    out[(static_cast<int64_t>(batch) * heads + head) * head_dim + d] =
        xopt::from_float<T>(denominator > 0.0f ? numerator / denominator : 0.0f);
  }
}

}  // namespace

// q: the query of sequence b at q + b·q_batch_stride, heads × head_dim contiguous; caches:
// [batch, kv_heads, capacity, head_dim]; lengths: int32 [batch] valid keys; bias: additive per key,
// rows bias_batch_stride apart, or null; workspace: float [batch, heads, splits, head_dim + 2];
// out: [batch, heads, head_dim].
extern "C" int xopt_decode_attention(int dtype, const void* q, const void* k_cache, const void* v_cache,
                                     const int* lengths, const void* bias, float* workspace, void* out, int batch,
                                     int heads, int kv_heads, int head_dim, int capacity, int splits,
                                     int64_t q_batch_stride, int64_t bias_batch_stride, float scale,
                                     cudaStream_t stream) {
  if (batch <= 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0 ||
      head_dim > xopt::kMaxHeadDim || splits <= 0 || splits > 65535 || capacity <= 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 partial_grid(splits, heads, batch);
  const dim3 combine_grid(heads, batch);
  const int combine_threads = ((head_dim + 31) / 32) * 32;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    decode_partial_kernel<T><<<partial_grid, 32 * kWarps, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), lengths,
        static_cast<const T*>(bias), workspace, heads, kv_heads, head_dim, capacity, q_batch_stride,
        bias_batch_stride, scale);
    decode_combine_kernel<T><<<combine_grid, combine_threads, 0, stream>>>(workspace, static_cast<T*>(out), heads,
                                                                           head_dim, splits);
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}
