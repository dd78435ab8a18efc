// One CUDA kernel shape for the elementwise passes of ia3_linear and adapter_bottleneck that
// may also reduce over rows (column sums), plus a per-row dot product:
//
//   colwise   for every (m, c) of an [M, C] row-major matrix: s = fn(m, c, m * C + c), where
//             fn does its own reads / writes (scaling, activation, ...) and returns a column
//             contribution s; part[z, c] = sum of s over the rows of chunk z (when asked).
//             The caller sums part over z (at::sum): two stages, no atomics, deterministic.
//   rowdot    out[n] = sum_k a[n, k] * b[n, k] (+ extra[n]), and optionally a[n, k] *= l[n]
//             in place after the read (one warp per row).
//
// Block (32, 8): threadIdx.x walks 32 consecutive columns (coalesced), threadIdx.y strides the
// rows of the block's chunk; the 8 row partials are reduced in shared memory in a fixed order.
// Accumulation in at::opmath_type (float for half / bfloat16 / float, double for double).
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace fastpeft {
namespace colwise {

constexpr int kCols = 32;          // columns per block (threadIdx.x)
constexpr int kRows = 8;           // row lanes per block (threadIdx.y)
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxPartial = int64_t{1} << 24;  // elements of the partial-sum buffer

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t, typename Fn>
__global__ void __launch_bounds__(kCols* kRows)
    colwise_kernel(Fn fn, acc_t* __restrict__ part, int64_t M, int64_t C,
                   int64_t rows_per_chunk) {
  __shared__ acc_t red[kRows][kCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t z = blockIdx.y;
  const int64_t m0 = z * rows_per_chunk;
  const int64_t m1 = (m0 + rows_per_chunk) < M ? (m0 + rows_per_chunk) : M;
  acc_t s = acc_t(0);
  if (c < C) {
    for (int64_t m = m0 + threadIdx.y; m < m1; m += kRows) s += fn(m, c, m * C + c);
  }
  if (part == nullptr) return;  // uniform over the grid
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t = red[0][threadIdx.x];
#pragma unroll
    for (int r = 1; r < kRows; ++r) t += red[r][threadIdx.x];
    part[z * C + c] = t;
  }
}

// Runs fn over [M, C]. With reduce = true returns part [n_chunks, C] (dtype acc_dtype, every
// element written) whose sum over dim 0 is the column sums of fn's return values; else an
// undefined tensor. `opts` gives the device of part.
template <typename acc_t, typename Fn>
at::Tensor launch(Fn fn, int64_t M, int64_t C, bool reduce, const at::TensorOptions& opts,
                  cudaStream_t stream) {
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  if (M <= 0 || C <= 0) {
    return reduce ? at::zeros({1, C < 0 ? 0 : C}, opts.dtype(acc_dtype)) : at::Tensor();
  }
  int64_t n_chunks = ceil_div(M, kMinChunkRows);
  if (reduce) {
    const int64_t cap = kMaxPartial / C;
    if (n_chunks > cap) n_chunks = cap;
  }
  if (n_chunks > kMaxGridY) n_chunks = kMaxGridY;
  if (n_chunks < 1) n_chunks = 1;
  const int64_t rows_per_chunk = ceil_div(M, n_chunks);
  n_chunks = ceil_div(M, rows_per_chunk);
  const int64_t gx = ceil_div(C, kCols);
  TORCH_CHECK(gx <= INT32_MAX, "fastpeft: ", C, " columns are too many for one launch");

  at::Tensor part;
  acc_t* part_ptr = nullptr;
  if (reduce) {
    part = at::empty({n_chunks, C}, opts.dtype(acc_dtype));
    part_ptr = part.mutable_data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(n_chunks));
  const dim3 block(kCols, kRows);
  colwise_kernel<acc_t, Fn><<<grid, block, 0, stream>>>(fn, part_ptr, M, C, rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

// ---------------------------------------------------------------------------------------------
// rowdot: grid ceil(N / 8), block (32, 8); warp y of a block owns row n = blockIdx.x * 8 + y.
// out[n] = sum_k a[n, k] * b[n, k] + (extra_scale ? extra_scale[n] * extra[n] : 0);
// when l != nullptr, a[n, k] is replaced by a[n, k] * l[n] after it was read.
template <typename scalar_t>
__global__ void __launch_bounds__(kCols* kRows)
    rowdot_kernel(scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                  const scalar_t* __restrict__ l, const scalar_t* __restrict__ extra_scale,
                  const at::opmath_type<scalar_t>* __restrict__ extra,
                  scalar_t* __restrict__ out, int64_t N, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y;
  if (n >= N) return;  // whole warps leave together
  scalar_t* an = a + n * K;
  const scalar_t* bn = b + n * K;
  const acc_t ln = l != nullptr ? static_cast<acc_t>(l[n]) : acc_t(1);
  acc_t s = acc_t(0);
  for (int64_t k = threadIdx.x; k < K; k += kCols) {
    const acc_t av = static_cast<acc_t>(an[k]);
    s += av * static_cast<acc_t>(bn[k]);
    if (l != nullptr) an[k] = static_cast<scalar_t>(av * ln);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (threadIdx.x == 0) {
    if (extra_scale != nullptr) s += static_cast<acc_t>(extra_scale[n]) * extra[n];
    out[n] = static_cast<scalar_t>(s);
  }
}

template <typename scalar_t>
void launch_rowdot(scalar_t* a, const scalar_t* b, const scalar_t* l, const scalar_t* extra_scale,
                   const at::opmath_type<scalar_t>* extra, scalar_t* out, int64_t N, int64_t K,
                   cudaStream_t stream) {
  if (N <= 0) return;
  const int64_t gx = ceil_div(N, kRows);
  TORCH_CHECK(gx <= INT32_MAX, "fastpeft: ", N, " rows are too many for one launch");
  rowdot_kernel<scalar_t><<<static_cast<unsigned>(gx), dim3(kCols, kRows), 0, stream>>>(
      a, b, l, extra_scale, extra, out, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace colwise
}  // namespace fastpeft
