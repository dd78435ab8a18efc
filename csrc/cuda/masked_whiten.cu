// CUDA masked_whiten and its backward (semantics: csrc/torch_bindings.cpp; the backward's
// formula in csrc/cpu/masked_whiten.cpp). Forward: block partials of (count, sum) over the
// mask, then of the centred squares (the mean read on the device, no host sync), a one-thread
// kernel writing stats = [mean, rstd, 1/max(n,1), 1/max(n-1,1)], one elementwise pass.
// Backward: block partials of (sum g, sum g (x - mean)) over all entries, one elementwise pass.
// Every reduction adds the blocks' partials in a fixed order (cuda/masked_reduce.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/ppo_math.h"
#include "cuda/masked_reduce.cuh"
#include "ops.h"

namespace fastpeft {
namespace {

constexpr double kWhitenEps = 1e-8;

#define FASTPEFT_GRID_STRIDE(i, N)                                                        \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (N); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// partials[b] = (count, sum of x) over the mask.
template <typename scalar_t, typename acc_t>
__global__ void count_sum_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                                 int64_t N, acc_t* partials) {
  acc_t s[2] = {0, 0};
  FASTPEFT_GRID_STRIDE(i, N) {
    if (mask[i]) {
      s[0] += acc_t(1);
      s[1] += acc_t(x[i]);
    }
  }
  masked_reduce::block_sum<2, acc_t>(s);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 2] = s[0];
    partials[blockIdx.x * 2 + 1] = s[1];
  }
}

// partials[b] = sum over the mask of (x - mean)^2, mean from totals1 = (n, sum).
template <typename scalar_t, typename acc_t>
__global__ void centred_squares_kernel(const scalar_t* __restrict__ x,
                                       const bool* __restrict__ mask, int64_t N,
                                       const double* totals1, acc_t* partials) {
  const acc_t mean = acc_t(totals1[1] / (totals1[0] > 1.0 ? totals1[0] : 1.0));
  acc_t s[1] = {0};
  FASTPEFT_GRID_STRIDE(i, N) {
    if (mask[i]) {
      const acc_t c = acc_t(x[i]) - mean;
      s[0] += c * c;
    }
  }
  masked_reduce::block_sum<1, acc_t>(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}

template <typename stat_t>
__global__ void whiten_stats_kernel(const double* totals1, const double* totals2, stat_t* stats) {
  const double n = totals1[0];
  const double inv_n = 1.0 / (n > 1.0 ? n : 1.0), inv_d = 1.0 / (n - 1.0 > 1.0 ? n - 1.0 : 1.0);
  stats[0] = stat_t(totals1[1] * inv_n);
  stats[1] = stat_t(1.0 / ::sqrt(totals2[0] * inv_d + kWhitenEps));
  stats[2] = stat_t(inv_n);
  stats[3] = stat_t(inv_d);
}

template <typename scalar_t, typename stat_t>
__global__ void whiten_apply_kernel(const scalar_t* __restrict__ x, int64_t N,
                                    const stat_t* stats, bool shift_mean,
                                    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t mean = acc_t(stats[0]), rstd = acc_t(stats[1]);
  const acc_t add = shift_mean ? acc_t(0) : mean;
  FASTPEFT_GRID_STRIDE(i, N) { out[i] = static_cast<scalar_t>((acc_t(x[i]) - mean) * rstd + add); }
}

// partials[b] = (sum g, sum g (x - mean)) over every entry.
template <typename scalar_t, typename acc_t, typename stat_t>
__global__ void grad_sums_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                 int64_t N, const stat_t* stats, acc_t* partials) {
  const acc_t mean = acc_t(stats[0]);
  acc_t s[2] = {0, 0};
  FASTPEFT_GRID_STRIDE(i, N) {
    const acc_t gi = acc_t(g[i]);
    s[0] += gi;
    s[1] += gi * (acc_t(x[i]) - mean);
  }
  masked_reduce::block_sum<2, acc_t>(s);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 2] = s[0];
    partials[blockIdx.x * 2 + 1] = s[1];
  }
}

// dx = g s + m [ (1/n) sum g (shift ? -s : 1 - s) - s^3 / d (x - mean) sum g (x - mean) ].
template <typename scalar_t, typename stat_t>
__global__ void whiten_backward_kernel(const scalar_t* __restrict__ g,
                                       const scalar_t* __restrict__ x,
                                       const bool* __restrict__ mask, int64_t N,
                                       const stat_t* stats, const double* sums, bool shift_mean,
                                       scalar_t* __restrict__ dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const double s = static_cast<double>(stats[1]);
  const acc_t a = acc_t(static_cast<double>(stats[2]) * sums[0] * (shift_mean ? -s : 1.0 - s));
  const acc_t c = acc_t(s * s * s * static_cast<double>(stats[3]) * sums[1]);
  const acc_t sa = acc_t(s), mean = acc_t(stats[0]);
  FASTPEFT_GRID_STRIDE(i, N) {
    acc_t d = acc_t(g[i]) * sa;
    if (mask[i]) d += a - c * (acc_t(x[i]) - mean);
    dx[i] = static_cast<scalar_t>(d);
  }
}

#undef FASTPEFT_GRID_STRIDE

template <typename scalar_t>
using stat_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace

std::tuple<Tensor, Tensor> masked_whiten_cuda(const Tensor& x_in, const Tensor& mask_in,
                                              bool shift_mean) {
  check_cuda_input(x_in, "masked_whiten");
  check_whiten_args(x_in, mask_in);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor x = x_in.contiguous(), mask = mask_in.contiguous();
  const int64_t N = x.numel();
  const int blocks = masked_reduce::blocks_for(N);
  Tensor out = at::empty({N}, x.options());
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor stats = at::empty({4}, x.options().dtype(stats_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fastpeft_masked_whiten", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using stat_t = stat_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    Tensor p1 = at::empty({blocks, 2}, x.options().dtype(acc_dtype));
    count_sum_kernel<scalar_t, acc_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), N, p1.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor totals1 = masked_reduce::reduce_partials<2, acc_t>(p1, blocks, stream);
    Tensor p2 = at::empty({blocks, 1}, x.options().dtype(acc_dtype));
    centred_squares_kernel<scalar_t, acc_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), N,
        totals1.const_data_ptr<double>(), p2.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor totals2 = masked_reduce::reduce_partials<1, acc_t>(p2, blocks, stream);
    whiten_stats_kernel<stat_t><<<1, 1, 0, stream>>>(totals1.const_data_ptr<double>(),
                                                     totals2.const_data_ptr<double>(),
                                                     stats.mutable_data_ptr<stat_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    whiten_apply_kernel<scalar_t, stat_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), N, stats.const_data_ptr<stat_t>(), shift_mean,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats};
}

Tensor masked_whiten_backward_cuda(const Tensor& grad_in, const Tensor& x_in,
                                   const Tensor& mask_in, const Tensor& stats_in,
                                   bool shift_mean) {
  check_cuda_input(x_in, "masked_whiten");
  check_whiten_backward_args(grad_in, x_in, mask_in, stats_in);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), mask = mask_in.contiguous();
  const Tensor stats = stats_in.contiguous();
  const int64_t N = x.numel();
  const int blocks = masked_reduce::blocks_for(N);
  Tensor dx = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fastpeft_masked_whiten_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using stat_t = stat_type<scalar_t>;
    Tensor p = at::empty({blocks, 2}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    grad_sums_kernel<scalar_t, acc_t, stat_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), N,
        stats.const_data_ptr<stat_t>(), p.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor sums = masked_reduce::reduce_partials<2, acc_t>(p, blocks, stream);
    whiten_backward_kernel<scalar_t, stat_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
        N, stats.const_data_ptr<stat_t>(), sums.const_data_ptr<double>(), shift_mean,
        dx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("masked_whiten", &fastpeft::masked_whiten_cuda);
  m.impl("masked_whiten_backward", &fastpeft::masked_whiten_backward_cuda);
}
