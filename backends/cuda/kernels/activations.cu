// Elementwise activations with their neighbours fused in.
//
//   bias + GELU:  y = gelu(x + b), exact  gelu(v) = v · ½(1 + erf(v/√2)),
//                 or the tanh form         gelu(v) ≈ v · ½(1 + tanh(√(2/π)(v + 0.044715 v³)))
//                 (ONNX Runtime's BiasGelu and FastGelu);
//   gated (GLU):  y = act(g) · u, with g and u the two halves of each row of the merged gate/up
//                 projection [rows, 2·I] → y [rows, I]; act = silu (SwiGLU: g·σ(g)) or either GELU
//                 (GeGLU).
#include "common.cuh"

namespace {

__device__ __forceinline__ float gelu(float v, bool tanh_form) {
  if (!tanh_form) return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
  // tanh(u) = 1 − 2 / (e^{2u} + 1): --use_fast_math turns tanhf into tanh.approx (~5e-4 relative error)
  const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return 0.5f * v * (2.0f - 2.0f / (__expf(2.0f * u) + 1.0f));
}

template <typename T>
__global__ void bias_gelu_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                 int64_t count, int cols, bool tanh_form) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = xopt::to_float(x[i]);
    if (bias != nullptr) v += xopt::to_float(bias[i % cols]);
    y[i] = xopt::from_float<T>(gelu(v, tanh_form));
  }
}

// activation codes of xopt_glu
#define XOPT_GLU_SILU 0
#define XOPT_GLU_GELU 1
#define XOPT_GLU_GELU_TANH 2

template <typename T>
__global__ void glu_kernel(const T* __restrict__ gate_up, T* __restrict__ y, int64_t count, int width, int activation) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / width;
    const int64_t col = i - row * width;
    const float g = xopt::to_float(gate_up[row * 2 * width + col]);
    const float u = xopt::to_float(gate_up[row * 2 * width + width + col]);
    const float a = activation == XOPT_GLU_SILU ? g / (1.0f + __expf(-g)) : gelu(g, activation == XOPT_GLU_GELU_TANH);
    y[i] = xopt::from_float<T>(a * u);
  }
}

int grid_for(int64_t count, int threads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace

extern "C" int xopt_bias_gelu(int dtype, const void* x, const void* bias, void* y, int64_t count, int cols,
                              int tanh_form, cudaStream_t stream) {
  if (count <= 0 || cols <= 0) return static_cast<int>(cudaErrorInvalidValue);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    bias_gelu_kernel<T><<<grid_for(count, 256), 256, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), count, cols, tanh_form != 0);
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}

// gate_up: [rows, 2·width] (gate first); y: [rows, width] = act(gate) · up, act by XOPT_GLU_* code.
extern "C" int xopt_glu(int dtype, const void* gate_up, void* y, int64_t rows, int width, int activation,
                        cudaStream_t stream) {
  if (rows <= 0 || width <= 0 || activation < XOPT_GLU_SILU || activation > XOPT_GLU_GELU_TANH)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t count = rows * width;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    glu_kernel<T><<<grid_for(count, 256), 256, 0, stream>>>(static_cast<const T*>(gate_up), static_cast<T*>(y), count,
                                                              width, activation);
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}
