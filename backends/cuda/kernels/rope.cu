// Rotary position embedding (RoPE), in place, on the heads of a packed token row.
//
// For the token at position p and each pair i < R/2 of a head (R ≤ D the rotary width; x₁ = x[i],
// x₂ = x[i + R/2], or the neighbours x[2i], x[2i+1] when interleaved; dimensions ≥ R unchanged),
// with c = cos_cache[p, i], s = sin_cache[p, i]:
//   x₁' = x₁·c − x₂·s,   x₂' = x₂·c + x₁·s.
// The semantics of ONNX Runtime's RotaryEmbedding and of GroupQueryAttention's do_rotary. Tokens are
// `token_stride` elements apart, so Q and K inside a packed QKV row are rotated in place.
#include "common.cuh"

namespace {

template <typename T>
__global__ void rope_kernel(T* __restrict__ x, const int64_t* __restrict__ positions, const T* __restrict__ cos_cache,
                            const T* __restrict__ sin_cache, int64_t tokens, int heads, int head_dim, int half,
                            int64_t token_stride, bool interleaved) {
  const int64_t count = tokens * heads * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int pair = static_cast<int>(i % half);
    const int64_t head_token = i / half;
    const int head = static_cast<int>(head_token % heads);
    const int64_t token = head_token / heads;
    T* row = x + token * token_stride + static_cast<int64_t>(head) * head_dim;
    const int64_t position = positions[token];
    const float c = xopt::to_float(cos_cache[position * half + pair]);
    const float s = xopt::to_float(sin_cache[position * half + pair]);
    const int first = interleaved ? 2 * pair : pair;
    const int second = interleaved ? 2 * pair + 1 : pair + half;
    const float x1 = xopt::to_float(row[first]);
    const float x2 = xopt::to_float(row[second]);
    row[first] = xopt::from_float<T>(x1 * c - x2 * s);
    row[second] = xopt::from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace

// x: `tokens` rows `token_stride` apart, `heads` heads of `head_dim` from the row's start;
// positions: int64 [tokens]; cos/sin caches: [positions, rotary_half] (rotary width 2·rotary_half ≤ head_dim).
extern "C" int xopt_rope(int dtype, void* x, const int64_t* positions, const void* cos_cache, const void* sin_cache,
                         int64_t tokens, int heads, int head_dim, int rotary_half, int64_t token_stride,
                         int interleaved, cudaStream_t stream) {
  if (tokens <= 0 || heads <= 0 || rotary_half <= 0 || 2 * rotary_half > head_dim)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t count = tokens * heads * rotary_half;
  const int64_t blocks = (count + 255) / 256;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<grid, 256, 0, stream>>>(static_cast<T*>(x), positions, static_cast<const T*>(cos_cache),
                                             static_cast<const T*>(sin_cache), tokens, heads, head_dim, rotary_half,
                                             token_stride, interleaved != 0);
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}
