// One warp attends one query to a run of keys with the online softmax (flash-attention's
// recurrence), the building block of the decode and packed encoder attention kernels.
//
// For keys t of the run, s_t = q·k_t + bias_t (q already scaled). Kept per warp: the running
// maximum m, the sum l = Σ exp(s_t − m) and the accumulator o = Σ exp(s_t − m)·v_t; each new key
// rescales them by exp(m_old − m_new). Lane j holds the dimensions j, j + 32, … of q and o.
#pragma once

#include <math.h>

#include "common.cuh"

namespace xopt {

constexpr int kMaxHeadDim = 256;
constexpr int kDimsPerLane = kMaxHeadDim / 32;

struct WarpSoftmaxState {
  float maximum = -INFINITY;
  float sum = 0.0f;
  float output[kDimsPerLane] = {};
};

// keys/values: rows `row_stride` elements apart; bias: per key or null.
template <typename T>
__device__ __forceinline__ void attend_run(WarpSoftmaxState& state, const float (&query)[kDimsPerLane],
                                           const T* __restrict__ keys, const T* __restrict__ values,
                                           int64_t row_stride, const T* __restrict__ bias, int begin, int end,
                                           int step, int head_dim) {
  const int lane = threadIdx.x & 31;
  for (int t = begin; t < end; t += step) {
    const T* key = keys + static_cast<int64_t>(t) * row_stride;
    float partial = 0.0f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) partial += query[i] * to_float(key[d]);
    }
    float score = warp_sum(partial);
    if (bias != nullptr) score += to_float(bias[t]);
    if (score == -INFINITY) continue;  // a fully masked key adds nothing
    const float maximum = fmaxf(state.maximum, score);
    const float correction = __expf(state.maximum - maximum);
    const float weight = __expf(score - maximum);
    state.sum = state.sum * correction + weight;
    const T* value = values + static_cast<int64_t>(t) * row_stride;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) state.output[i] = state.output[i] * correction + weight * to_float(value[d]);
    }
    state.maximum = maximum;
  }
}

template <typename T>
__device__ __forceinline__ void load_query(float (&query)[kDimsPerLane], const T* __restrict__ q, int head_dim,
                                           float scale) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    query[i] = d < head_dim ? to_float(q[d]) * scale : 0.0f;
  }
}

}  // namespace xopt
