// Shared device helpers of xopt's CUDA kernels: element types, conversions, reductions, launch checks.
//
// Every kernel stores in the model's dtype and computes in float32. Launchers are `extern "C"`
// functions that take a dtype code (XOPT_FLOAT32, XOPT_FLOAT16, XOPT_BFLOAT16), raw device
// pointers, sizes and a stream, and return a cudaError_t as int (0: launched).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define XOPT_FLOAT32 0
#define XOPT_FLOAT16 1
#define XOPT_BFLOAT16 2

namespace xopt {

template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  value = warp_sum(value);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = lane < warps ? partial[lane] : 0.0f;
  return warp_sum(value);
}

}  // namespace xopt

// Runs `launch(T{})` with T the element type of `dtype`; an unknown code is cudaErrorInvalidValue.
#define XOPT_DISPATCH_DTYPE(dtype, launch)                              \
  switch (dtype) {                                                      \
    case XOPT_FLOAT32: launch(float{}); break;                          \
    case XOPT_FLOAT16: launch(__half{}); break;                         \
    case XOPT_BFLOAT16: launch(__nv_bfloat16{}); break;                 \
    default: return static_cast<int>(cudaErrorInvalidValue);            \
  }                                                                     \
  return static_cast<int>(cudaGetLastError());
