// CUDA kernels shared by csrc/cuda/lora_linear.cu and csrc/cuda/lora_linear_multi.cu.
//
// The LoRA adapter matrices are small (rank r, up to ~128), so besides the cuBLAS GEMMs of
// the base layer three simple kernel shapes cover every LoRA term:
//
//   shrink  out[m, j]  = sum_c in[m, c] * drop(m, c) * W_{id[m]}[j, c]        out [M, r]
//   expand  out[m, c] += s_m * drop(m, c) * sum_j v[m, j] * W_{id[m]}[j, c]   out [M, C]
//   outer   part[z, a, j, c] = sum_{m in chunk z, id[m] == a} u[m, j] * v[m, c]
//
// W is always laid out [n_adapters, r, C] with C contiguous (lora_a as is; lora_b is
// transposed to [n, r, N] by the caller, a small copy). ids == nullptr means one adapter
// (index 0) for every row. A row whose id is outside [0, n) gets no LoRA term (id -1 is
// "base only"; other values cannot pass the Python validation, and are skipped rather than
// read out of bounds). drop(m, c) is 1 when DROPOUT is false, else
// keep(m * C + c) / (1 - p) with keep from csrc/common/philox.h, the mask every backend draws.
//
// All index arithmetic is int64; accumulation is in at::opmath_type (float for
// half / bfloat16 / float, double for double). Every launch helper checks grid limits,
// skips empty launches and calls C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "common/philox.h"

namespace fastpeft {
namespace cuda_kernels {

constexpr int kThreads = 256;             // threads per block for every kernel here
constexpr int kWarps = kThreads / 32;
constexpr int kShrinkRows = 4;            // rows of `in` per shrink block
constexpr int kShrinkTileC = 256;         // columns of `in` staged in shared memory at a time
constexpr int kShrinkChunkJ = 64;         // outputs j per shrink block (grid.y covers the rest)
constexpr int kExpandRows = 4;            // rows per expand block
constexpr int kExpandChunkJ = 64;         // v values staged in shared memory at a time
constexpr int kOuterJ = 8;                // register accumulators (outputs j) per outer thread
constexpr int64_t kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Adapter of row m, or -1 when the row has no LoRA term.
__device__ __forceinline__ int64_t row_adapter(const int64_t* ids, int64_t m, int64_t M,
                                               int64_t n_adapters) {
  if (m >= M) return -1;
  if (ids == nullptr) return 0;
  const int64_t a = ids[m];
  return (a >= 0 && a < n_adapters) ? a : -1;
}

// ---------------------------------------------------------------------------------------------
// shrink: grid (ceil(M / kShrinkRows), ceil(r / kShrinkChunkJ)), block kThreads.
// Each block stages kShrinkRows rows of `in` (dropout applied while loading) tile by tile in
// shared memory; warp w computes outputs j = j0 + w, j0 + w + kWarps, ... of its chunk, each a
// lane-strided dot product over the tile reduced with shuffles and added to a shared
// accumulator owned by that warp alone.
template <typename scalar_t, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    lora_shrink_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ w,
                       const int64_t* __restrict__ ids, scalar_t* __restrict__ out, int64_t M,
                       int64_t C, int64_t r, int64_t n_adapters, uint64_t seed,
                       uint32_t threshold, double keep_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t xs[kShrinkRows * kShrinkTileC];
  __shared__ acc_t acc[kShrinkRows * kShrinkChunkJ];

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kShrinkChunkJ;
  const int64_t jn = (r - j0) < kShrinkChunkJ ? (r - j0) : kShrinkChunkJ;

  const scalar_t* wrow[kShrinkRows];  // base of W_{id[m]} per row, nullptr when no LoRA term
#pragma unroll
  for (int rr = 0; rr < kShrinkRows; ++rr) {
    const int64_t a = row_adapter(ids, row0 + rr, M, n_adapters);
    wrow[rr] = a >= 0 ? w + a * r * C : nullptr;
  }

  for (int i = tid; i < kShrinkRows * kShrinkChunkJ; i += kThreads) acc[i] = acc_t(0);

  for (int64_t c0 = 0; c0 < C; c0 += kShrinkTileC) {
    const int cn = static_cast<int>((C - c0) < kShrinkTileC ? (C - c0) : kShrinkTileC);
    __syncthreads();  // the previous tile is no longer read (and acc is initialised)
    for (int i = tid; i < kShrinkRows * kShrinkTileC; i += kThreads) {
      const int rr = i / kShrinkTileC;
      const int cc = i % kShrinkTileC;
      const int64_t m = row0 + rr;
      acc_t v = acc_t(0);
      if (cc < cn && wrow[rr] != nullptr) {
        const int64_t idx = m * C + c0 + cc;
        v = static_cast<acc_t>(in[idx]);
        if constexpr (DROPOUT) {
          v = dropout_keep(static_cast<uint64_t>(idx), seed, threshold)
                  ? v * static_cast<acc_t>(keep_scale)
                  : acc_t(0);
        }
      }
      xs[i] = v;
    }
    __syncthreads();
    for (int64_t jj = warp; jj < jn; jj += kWarps) {
      const int64_t j = j0 + jj;
      acc_t part[kShrinkRows];
#pragma unroll
      for (int rr = 0; rr < kShrinkRows; ++rr) part[rr] = acc_t(0);
      if (ids == nullptr) {
        // One adapter: every valid row shares W, load each weight once.
        const scalar_t* wj = w + j * C + c0;
        for (int cc = lane; cc < cn; cc += 32) {
          const acc_t wv = static_cast<acc_t>(wj[cc]);
#pragma unroll
          for (int rr = 0; rr < kShrinkRows; ++rr) part[rr] += xs[rr * kShrinkTileC + cc] * wv;
        }
      } else {
#pragma unroll
        for (int rr = 0; rr < kShrinkRows; ++rr) {
          if (wrow[rr] == nullptr) continue;
          const scalar_t* wj = wrow[rr] + j * C + c0;
          for (int cc = lane; cc < cn; cc += 32)
            part[rr] += xs[rr * kShrinkTileC + cc] * static_cast<acc_t>(wj[cc]);
        }
      }
#pragma unroll
      for (int rr = 0; rr < kShrinkRows; ++rr) {
        const acc_t s = warp_sum(part[rr]);
        if (lane == 0) acc[rr * kShrinkChunkJ + jj] += s;
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < kShrinkRows * kShrinkChunkJ; i += kThreads) {
    const int rr = i / kShrinkChunkJ;
    const int jj = i % kShrinkChunkJ;
    const int64_t m = row0 + rr;
    if (m < M && jj < jn) {
      // Rows without a LoRA term (id -1) get t = 0: their acc stayed 0.
      out[m * r + j0 + jj] = static_cast<scalar_t>(acc[i]);
    }
  }
}

// out [M, r] = in [M, C] . W_{id}^T (with the dropout mask on `in` when dropout is true).
template <typename scalar_t>
void launch_shrink(const scalar_t* in, const scalar_t* w, const int64_t* ids, scalar_t* out,
                   int64_t M, int64_t C, int64_t r, int64_t n_adapters, bool dropout,
                   uint64_t seed, uint32_t threshold, double keep_scale, cudaStream_t stream) {
  if (M <= 0 || r <= 0) return;
  const int64_t gx = ceil_div(M, kShrinkRows);
  const int64_t gy = ceil_div(r, kShrinkChunkJ);
  TORCH_CHECK(gx <= INT32_MAX && gy <= kMaxGridYZ, "fastpeft: lora shrink: too many rows (", M,
              ") or too large a rank (", r, ") for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (dropout) {
    lora_shrink_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        in, w, ids, out, M, C, r, n_adapters, seed, threshold, keep_scale);
  } else {
    lora_shrink_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        in, w, ids, out, M, C, r, n_adapters, seed, threshold, keep_scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// expand: grid (ceil(M / kExpandRows), ceil(C / kThreads)), block kThreads; thread c of a
// block owns column c of kExpandRows rows. v is staged kExpandChunkJ values at a time; the
// weight reads W[j, c] are coalesced over c.
// The row scale is scalings[id] when scalings != nullptr, else `scaling`.
template <typename scalar_t, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    lora_expand_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ w,
                       const int64_t* __restrict__ ids, const float* __restrict__ scalings,
                       double scaling, scalar_t* __restrict__ out, int64_t M, int64_t C,
                       int64_t r, int64_t n_adapters, uint64_t seed, uint32_t threshold,
                       double keep_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t vs[kExpandRows * kExpandChunkJ];

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kExpandRows;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + tid;
  const bool c_ok = c < C;

  const scalar_t* wrow[kExpandRows];
  acc_t scale[kExpandRows];
  acc_t sum[kExpandRows];
#pragma unroll
  for (int rr = 0; rr < kExpandRows; ++rr) {
    const int64_t a = row_adapter(ids, row0 + rr, M, n_adapters);
    wrow[rr] = a >= 0 ? w + a * r * C : nullptr;
    scale[rr] = a >= 0 ? static_cast<acc_t>(scalings != nullptr ? scalings[a] : scaling)
                       : acc_t(0);
    sum[rr] = acc_t(0);
  }

  for (int64_t j0 = 0; j0 < r; j0 += kExpandChunkJ) {
    const int jn = static_cast<int>((r - j0) < kExpandChunkJ ? (r - j0) : kExpandChunkJ);
    __syncthreads();  // the previous chunk is no longer read
    for (int i = tid; i < kExpandRows * kExpandChunkJ; i += kThreads) {
      const int rr = i / kExpandChunkJ;
      const int jj = i % kExpandChunkJ;
      const int64_t m = row0 + rr;
      vs[i] = (jj < jn && wrow[rr] != nullptr) ? static_cast<acc_t>(v[m * r + j0 + jj])
                                               : acc_t(0);
    }
    __syncthreads();
    if (c_ok) {
      if (ids == nullptr) {
        for (int jj = 0; jj < jn; ++jj) {
          const acc_t wv = static_cast<acc_t>(w[(j0 + jj) * C + c]);
#pragma unroll
          for (int rr = 0; rr < kExpandRows; ++rr) sum[rr] += vs[rr * kExpandChunkJ + jj] * wv;
        }
      } else {
#pragma unroll
        for (int rr = 0; rr < kExpandRows; ++rr) {
          if (wrow[rr] == nullptr) continue;
          for (int jj = 0; jj < jn; ++jj)
            sum[rr] += vs[rr * kExpandChunkJ + jj] *
                       static_cast<acc_t>(wrow[rr][(j0 + jj) * C + c]);
        }
      }
    }
  }

  if (!c_ok) return;
#pragma unroll
  for (int rr = 0; rr < kExpandRows; ++rr) {
    if (wrow[rr] == nullptr) continue;  // also covers m >= M
    const int64_t idx = (row0 + rr) * C + c;
    acc_t add = sum[rr] * scale[rr];
    if constexpr (DROPOUT) {
      add = dropout_keep(static_cast<uint64_t>(idx), seed, threshold)
                ? add * static_cast<acc_t>(keep_scale)
                : acc_t(0);
    }
    out[idx] = static_cast<scalar_t>(static_cast<acc_t>(out[idx]) + add);
  }
}

// out [M, C] += s_m * drop(m, c) * v [M, r] . W_{id} [r, C], in place.
template <typename scalar_t>
void launch_expand(const scalar_t* v, const scalar_t* w, const int64_t* ids,
                   const float* scalings, double scaling, scalar_t* out, int64_t M, int64_t C,
                   int64_t r, int64_t n_adapters, bool dropout, uint64_t seed,
                   uint32_t threshold, double keep_scale, cudaStream_t stream) {
  if (M <= 0 || C <= 0 || r <= 0) return;
  const int64_t gx = ceil_div(M, kExpandRows);
  const int64_t gy = ceil_div(C, kThreads);
  TORCH_CHECK(gx <= INT32_MAX && gy <= kMaxGridYZ, "fastpeft: lora expand: too many rows (", M,
              ") or columns (", C, ") for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (dropout) {
    lora_expand_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        v, w, ids, scalings, scaling, out, M, C, r, n_adapters, seed, threshold, keep_scale);
  } else {
    lora_expand_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        v, w, ids, scalings, scaling, out, M, C, r, n_adapters, seed, threshold, keep_scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// outer (segmented per adapter): grid (ceil(C / kThreads), n_adapters * ceil(r / kOuterJ),
// n_chunks), block kThreads. Block (x, y, z) sums, over the rows of chunk z whose id is its
// adapter a, u[m, j] * v[m, c] for kOuterJ outputs j and one column c per thread, in registers,
// and writes part[z, a, j, c] (every element of part is written exactly once, zeros included,
// so part needs no initialisation). The caller sums part over z: deterministic, no atomics.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lora_outer_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v,
                      const int64_t* __restrict__ ids, at::opmath_type<scalar_t>* __restrict__ part,
                      int64_t M, int64_t C, int64_t r, int64_t n_adapters, int64_t r_tiles,
                      int64_t rows_per_chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t a = static_cast<int64_t>(blockIdx.y) / r_tiles;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.y) % r_tiles) * kOuterJ;
  const int64_t z = blockIdx.z;
  const int64_t m_begin = z * rows_per_chunk;
  const int64_t m_end = (m_begin + rows_per_chunk) < M ? (m_begin + rows_per_chunk) : M;
  const bool c_ok = c < C;

  acc_t sum[kOuterJ];
#pragma unroll
  for (int jj = 0; jj < kOuterJ; ++jj) sum[jj] = acc_t(0);

  if (c_ok) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      if (row_adapter(ids, m, M, n_adapters) != a) continue;  // uniform across the block
      const acc_t vv = static_cast<acc_t>(v[m * C + c]);
      const scalar_t* um = u + m * r + j0;
#pragma unroll
      for (int jj = 0; jj < kOuterJ; ++jj) {
        if (j0 + jj < r) sum[jj] += static_cast<acc_t>(um[jj]) * vv;
      }
    }
#pragma unroll
    for (int jj = 0; jj < kOuterJ; ++jj) {
      if (j0 + jj < r) part[((z * n_adapters + a) * r + j0 + jj) * C + c] = sum[jj];
    }
  }
}

// Returns part [n_chunks, n_adapters, r, C] in opmath dtype; part.sum(0)[a, j, c] =
// sum_{m: id[m] == a} u[m, j] * v[m, c]. `opts` are the options of the part tensor.
template <typename scalar_t>
at::Tensor launch_outer(const scalar_t* u, const scalar_t* v, const int64_t* ids, int64_t M,
                        int64_t C, int64_t r, int64_t n_adapters, const at::TensorOptions& opts,
                        cudaStream_t stream) {
  // Chunks of at least 64 rows for parallelism over M, but part stays below ~2^24 elements
  // (or one chunk, the size of the result itself).
  const int64_t out_numel = n_adapters * r * C;
  int64_t n_chunks = ceil_div(M, 64);
  const int64_t cap = out_numel > 0 ? ((int64_t{1} << 24) / out_numel) : 1;
  if (n_chunks > cap) n_chunks = cap;
  if (n_chunks > kMaxGridYZ) n_chunks = kMaxGridYZ;
  if (n_chunks < 1) n_chunks = 1;
  const int64_t rows_per_chunk = M > 0 ? ceil_div(M, n_chunks) : 1;
  n_chunks = M > 0 ? ceil_div(M, rows_per_chunk) : 1;

  at::Tensor part = at::empty({n_chunks, n_adapters, r, C}, opts);
  if (part.numel() == 0) return part;
  if (M <= 0) return part.zero_();
  const int64_t r_tiles = ceil_div(r, kOuterJ);
  const int64_t gx = ceil_div(C, kThreads);
  const int64_t gy = n_adapters * r_tiles;
  TORCH_CHECK(gx <= INT32_MAX && gy <= kMaxGridYZ, "fastpeft: lora adapter gradient: ",
              n_adapters, " adapters of rank ", r, " and width ", C,
              " are too many for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                  static_cast<unsigned>(n_chunks));
  lora_outer_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      u, v, ids, part.data_ptr<at::opmath_type<scalar_t>>(), M, C, r, n_adapters, r_tiles,
      rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

// ---------------------------------------------------------------------------------------------
// dropout apply: out[i] = keep(i) ? x[i] / (1 - p) : 0 over a flat tensor. One thread draws one
// Philox block (four consecutive indices 4q .. 4q + 3), exactly what dropout_keep(i) reads.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dropout_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                         int64_t numel, uint64_t seed, uint32_t threshold, double keep_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_blocks4 = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n_blocks4;
       q += stride) {
    const Philox4 rnd = philox4x32(static_cast<uint64_t>(q), seed);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = q * 4 + lane;
      if (i < numel) {
        out[i] = rnd.v[lane] >= threshold
                     ? static_cast<scalar_t>(static_cast<acc_t>(x[i]) *
                                             static_cast<acc_t>(keep_scale))
                     : static_cast<scalar_t>(acc_t(0));
      }
    }
  }
}

template <typename scalar_t>
void launch_dropout_apply(const scalar_t* x, scalar_t* out, int64_t numel, uint64_t seed,
                          uint32_t threshold, double keep_scale, cudaStream_t stream) {
  if (numel <= 0) return;
  int64_t blocks = ceil_div(ceil_div(numel, 4), kThreads);
  if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
  dropout_apply_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x, out, numel, seed, threshold, keep_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_kernels
}  // namespace fastpeft
