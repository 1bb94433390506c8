// Weight-only quantized matrix product for decode, reading ONNX Runtime's MatMulNBits layout as is.
//
// B holds W (K × N) column by column: for column n and block b of `block_size` rows,
// blob[n, b] has the codes q of rows b·bs … b·bs + bs − 1 (4 bits: two per byte, the even row in
// the low nibble; 8 bits: one per byte). With scale s[n, b] and zero point z[n, b] (packed the same
// way; absent: 2^(bits−1), the symmetric grid),
//   W[k, n] = (q[k, n] − z[n, k / bs]) · s[n, k / bs],      Y[m, n] = Σ_k A[m, k] · W[k, n] (+ bias[n]).
//
// GEMV (few rows of A, the decode step): one warp per output column; each lane reads 8 codes
// (one 32-bit word at 4 bits) per step, so a warp streams 128 contiguous bytes of B, and the codes
// are dequantized in registers and never stored. Many rows (prefill): `xopt_dequantize_nbits`
// writes Wᵀ (N × K) once and the product goes to cuBLAS.
#include "common.cuh"

namespace {

constexpr int kCodesPerLane = 8;
constexpr int kRowsPerPass = 4;
constexpr int kWarpsPerBlock = 4;

template <int Bits>
__device__ __forceinline__ int code_at(const uint8_t* codes, int j) {
  if constexpr (Bits == 4) {
    return (codes[j >> 1] >> ((j & 1) * 4)) & 0xF;
  } else {
    return codes[j];
  }
}

template <int Bits>
__device__ __forceinline__ float zero_point(const uint8_t* zeros, int64_t column, int blocks, int block) {
  if (zeros == nullptr) return static_cast<float>(1 << (Bits - 1));
  if constexpr (Bits == 4) {
    const int64_t per_column = (blocks + 1) / 2;
    return static_cast<float>((zeros[column * per_column + block / 2] >> ((block & 1) * 4)) & 0xF);
  } else {
    return static_cast<float>(zeros[column * blocks + block]);
  }
}

template <typename T, int Bits>
__global__ void nbits_gemv_kernel(const T* __restrict__ a, const uint8_t* __restrict__ b, const T* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                                  int rows, int k_size, int n_size, int block_size) {
  const int lane = threadIdx.x & 31;
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (column >= n_size) return;
  const int blocks = (k_size + block_size - 1) / block_size;
  const int64_t column_bytes = static_cast<int64_t>(blocks) * block_size * Bits / 8;
  const uint8_t* column_codes = b + column * column_bytes;
  for (int row0 = 0; row0 < rows; row0 += kRowsPerPass) {
    float accumulator[kRowsPerPass] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = lane * kCodesPerLane; k0 < k_size; k0 += 32 * kCodesPerLane) {
      const int block = k0 / block_size;
      const float scale = xopt::to_float(scales[column * blocks + block]);
      const float zero = zero_point<Bits>(zeros, column, blocks, block);
      alignas(8) uint8_t codes[kCodesPerLane * Bits / 8];
      if constexpr (Bits == 4) {
        *reinterpret_cast<uint32_t*>(codes) = *reinterpret_cast<const uint32_t*>(column_codes + k0 / 2);
      } else {
        *reinterpret_cast<uint2*>(codes) = *reinterpret_cast<const uint2*>(column_codes + k0);
      }
      float weight[kCodesPerLane];
#pragma unroll
      for (int j = 0; j < kCodesPerLane; ++j) weight[j] = (static_cast<float>(code_at<Bits>(codes, j)) - zero) * scale;
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (row0 + r >= rows) break;
        const T* a_row = a + static_cast<int64_t>(row0 + r) * k_size + k0;
#pragma unroll
        for (int j = 0; j < kCodesPerLane; ++j) {
          if (k0 + j < k_size) accumulator[r] += weight[j] * xopt::to_float(a_row[j]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
      const float total = xopt::warp_sum(accumulator[r]);
      if (lane == 0 && row0 + r < rows) {
        const float shifted = bias != nullptr ? total + xopt::to_float(bias[column]) : total;
        y[static_cast<int64_t>(row0 + r) * n_size + column] = xopt::from_float<T>(shifted);
      }
    }
  }
}

template <typename T, int Bits>
__global__ void dequantize_nbits_kernel(const uint8_t* __restrict__ b, const T* __restrict__ scales,
                                        const uint8_t* __restrict__ zeros, T* __restrict__ w_transposed, int k_size,
                                        int n_size, int block_size) {
  const int blocks = (k_size + block_size - 1) / block_size;
  const int64_t column_bytes = static_cast<int64_t>(blocks) * block_size * Bits / 8;
  const int64_t count = static_cast<int64_t>(n_size) * k_size;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t column = i / k_size;
    const int k = static_cast<int>(i - column * k_size);
    const int block = k / block_size;
    const float code = static_cast<float>(code_at<Bits>(b + column * column_bytes, k));
    const float value = (code - zero_point<Bits>(zeros, column, blocks, block)) *
                        xopt::to_float(scales[column * blocks + block]);
    w_transposed[i] = xopt::from_float<T>(value);
  }
}

bool valid(int bits, int k_size, int n_size, int block_size) {
  return (bits == 4 || bits == 8) && k_size > 0 && n_size > 0 && block_size >= 16 &&
         (block_size & (block_size - 1)) == 0;
}

}  // namespace

// a: [rows, K]; b: [N, blocks, block_size·bits/8] uint8; scales: [N, blocks]; zeros: packed uint8 or
// null (symmetric); bias: [N] or null; y: [rows, N].
extern "C" int xopt_nbits_gemv(int dtype, const void* a, const uint8_t* b, const void* scales, const uint8_t* zeros,
                               const void* bias, void* y, int rows, int k_size, int n_size, int bits, int block_size,
                               cudaStream_t stream) {
  if (rows <= 0 || !valid(bits, k_size, n_size, block_size)) return static_cast<int>(cudaErrorInvalidValue);
  const int grid = (n_size + kWarpsPerBlock - 1) / kWarpsPerBlock;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    if (bits == 4) {
      nbits_gemv_kernel<T, 4><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(
          static_cast<const T*>(a), b, static_cast<const T*>(scales), zeros, static_cast<const T*>(bias),
          static_cast<T*>(y), rows, k_size, n_size, block_size);
    } else {
      nbits_gemv_kernel<T, 8><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(
          static_cast<const T*>(a), b, static_cast<const T*>(scales), zeros, static_cast<const T*>(bias),
          static_cast<T*>(y), rows, k_size, n_size, block_size);
    }
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}

// Writes Wᵀ: [N, K] in the scales' dtype.
extern "C" int xopt_dequantize_nbits(int dtype, const uint8_t* b, const void* scales, const uint8_t* zeros,
                                     void* w_transposed, int k_size, int n_size, int bits, int block_size,
                                     cudaStream_t stream) {
  if (!valid(bits, k_size, n_size, block_size)) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t count = static_cast<int64_t>(n_size) * k_size;
  const int64_t blocks = (count + 255) / 256;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    if (bits == 4) {
      dequantize_nbits_kernel<T, 4><<<grid, 256, 0, stream>>>(b, static_cast<const T*>(scales), zeros,
                                                               static_cast<T*>(w_transposed), k_size, n_size,
                                                               block_size);
    } else {
      dequantize_nbits_kernel<T, 8><<<grid, 256, 0, stream>>>(b, static_cast<const T*>(scales), zeros,
                                                               static_cast<T*>(w_transposed), k_size, n_size,
                                                               block_size);
    }
  };
  XOPT_DISPATCH_DTYPE(dtype, launch)
}
