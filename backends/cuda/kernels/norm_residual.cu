// RMSNorm / LayerNorm with the residual add fused in: one block per row.
//
//   h = x + skip (+ bias)                     (skip and bias optional; h written to `sum` when given)
//   RMSNorm:   y = h / sqrt(mean(h²) + eps) · γ
//   LayerNorm: y = (h − mean(h)) / sqrt(var(h) + eps) · γ + β
//
// The semantics of ONNX Runtime's (Skip)(Simplified)LayerNormalization. The row is kept in
// shared memory as float32 between the statistics and the scaling, so x and skip are read once.
#include "common.cuh"

// the row in dynamic shared memory plus block_sum's 32 floats within the default 48 KiB
#define XOPT_NORM_MAX_COLS (12 * 1024 - 32)

namespace {

template <typename T>
__global__ void norm_residual_kernel(const T* __restrict__ x, const T* __restrict__ skip, const T* __restrict__ bias,
                                     const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                                     T* __restrict__ sum, int cols, float eps, bool centred) {
  extern __shared__ float row[];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * cols;
  float total = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float h = xopt::to_float(x[offset + c]);
    if (skip != nullptr) h += xopt::to_float(skip[offset + c]);
    if (bias != nullptr) h += xopt::to_float(bias[c]);
    if (sum != nullptr) sum[offset + c] = xopt::from_float<T>(h);
    row[c] = h;
    total += h;
  }
  const float mean = centred ? xopt::block_sum(total) / cols : 0.0f;
  float squares = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = row[c] - mean;
    squares += d * d;
  }
  const float inverse_rms = rsqrtf(xopt::block_sum(squares) / cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float value = (row[c] - mean) * inverse_rms * xopt::to_float(gamma[c]);
    if (beta != nullptr) value += xopt::to_float(beta[c]);
    y[offset + c] = xopt::from_float<T>(value);
  }
}

}  // namespace

// centred = 0: RMSNorm (beta must be null); centred = 1: LayerNorm. Rows of `cols` contiguous elements.
extern "C" int xopt_norm_residual(int dtype, const void* x, const void* skip, const void* bias, const void* gamma,
                                  const void* beta, void* y, void* sum, int rows, int cols, float eps, int centred,
                                  cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || cols > XOPT_NORM_MAX_COLS) return static_cast<int>(cudaErrorInvalidValue);
  const int threads = cols >= 1024 ? 1024 : ((cols + 31) / 32) * 32;
  const size_t shared = static_cast<size_t>(cols) * sizeof(float);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    norm_residual_kernel<T><<<rows, threads, shared, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(skip), static_cast<const T*>(bias),
        static_cast<const T*>(gamma), static_cast<const T*>(beta), static_cast<T*>(y), static_cast<T*>(sum), cols,
        eps, centred != 0);
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}
