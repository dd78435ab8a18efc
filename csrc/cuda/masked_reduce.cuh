// Deterministic reductions for the PPO ops' CUDA kernels: each block sums K values over its
// threads (warp shuffles, then one warp over the warps' sums) and writes them to
// partials[block, K]; reduce_partials then adds the blocks' partials in a fixed order, in
// double, with one block. No atomics, so repeated runs give the same bits.
#pragma once

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace fastpeft {
namespace masked_reduce {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

// Blocks for a grid-stride pass over n elements (at least 1, so an empty input still writes
// its zero partials).
inline int blocks_for(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums v[k] over the block; the totals are valid in thread 0. Call once per kernel.
template <int K, typename T>
__device__ __forceinline__ void block_sum(T (&v)[K]) {
  __shared__ T shared[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) shared[k][warp] = v[k];
  }
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < warps ? shared[k][lane] : T(0));
  }
}

// totals[k] = sum over blocks b of partials[b * K + k], in double (one block).
template <int K, typename T>
__global__ void reduce_partials_kernel(const T* partials, int blocks, double* totals) {
  double v[K];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = 0.0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += static_cast<double>(partials[b * K + k]);
  }
  block_sum<K, double>(v);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) totals[k] = v[k];
  }
}

// The [K] double totals of a [blocks, K] partials tensor, on the device.
template <int K, typename T>
at::Tensor reduce_partials(const at::Tensor& partials, int blocks, cudaStream_t stream) {
  at::Tensor totals = at::empty({K}, partials.options().dtype(at::kDouble));
  reduce_partials_kernel<K, T><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<T>(), blocks,
                                                           totals.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return totals;
}

}  // namespace masked_reduce
}  // namespace fastpeft
