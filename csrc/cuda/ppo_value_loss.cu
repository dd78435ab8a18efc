// CUDA ppo_value_loss (semantics: csrc/torch_bindings.cpp, common/ppo_math.h): as
// ppo_policy_loss.cu, the mask count, one grid-stride pass (gradient + per-block partials of
// the loss and vf_clipfrac), a fixed-order reduction and a one-thread epilogue.
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

template <typename scalar_t>
__global__ void value_loss_kernel(const scalar_t* __restrict__ values,
                                  const scalar_t* __restrict__ old,
                                  const scalar_t* __restrict__ ret,
                                  const bool* __restrict__ mask, const int64_t* count, int64_t N,
                                  double clip, scalar_t* __restrict__ grad,
                                  at::opmath_type<scalar_t>* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = *count;
  const acc_t inv = n > 0 ? acc_t(1) / acc_t(n) : acc_t(0);
  acc_t s[2] = {0, 0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += stride) {
    if (!mask[i]) {
      grad[i] = scalar_t(0);
      continue;
    }
    const auto p = value_token<acc_t>(acc_t(values[i]), acc_t(old[i]), acc_t(ret[i]), acc_t(clip));
    grad[i] = static_cast<scalar_t>(p.dterm * inv);
    s[0] += p.term;
    s[1] += p.clipped ? acc_t(1) : acc_t(0);
  }
  masked_reduce::block_sum<2, acc_t>(s);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 2] = s[0];
    partials[blockIdx.x * 2 + 1] = s[1];
  }
}

template <typename scalar_t>
__global__ void value_loss_epilogue(const double* totals, const int64_t* count, scalar_t* loss,
                                    scalar_t* stats) {
  const int64_t n = *count;
  const double inv = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  loss[0] = static_cast<scalar_t>(0.5 * totals[0] * inv);
  stats[0] = static_cast<scalar_t>(totals[1] * inv);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ppo_value_loss_cuda(const Tensor& values_in,
                                                       const Tensor& old_in, const Tensor& ret_in,
                                                       const Tensor& mask_in, double clip) {
  check_cuda_input(values_in, "ppo_value_loss");
  check_value_loss_args(values_in, old_in, ret_in, mask_in);
  c10::cuda::CUDAGuard device_guard(values_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor values = values_in.contiguous(), old = old_in.contiguous();
  const Tensor ret = ret_in.contiguous(), mask = mask_in.contiguous();
  const int64_t N = values.numel();
  Tensor grad = at::empty({N}, values.options());
  Tensor loss = at::empty({}, values.options());
  Tensor stats = at::empty({1}, values.options());
  const Tensor count = at::sum(mask, at::kLong);
  const int blocks = masked_reduce::blocks_for(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(),
                                  "fastpeft_ppo_value_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor partials = at::empty({blocks, 2}, values.options().dtype(
                                                 c10::CppTypeToScalarType<acc_t>::value));
    value_loss_kernel<scalar_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        values.const_data_ptr<scalar_t>(), old.const_data_ptr<scalar_t>(),
        ret.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
        count.const_data_ptr<int64_t>(), N, clip, grad.mutable_data_ptr<scalar_t>(),
        partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor totals = masked_reduce::reduce_partials<2, acc_t>(partials, blocks, stream);
    value_loss_epilogue<scalar_t><<<1, 1, 0, stream>>>(
        totals.const_data_ptr<double>(), count.const_data_ptr<int64_t>(),
        loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, grad};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("ppo_value_loss", &fastpeft::ppo_value_loss_cuda);
  m.impl("ppo_value_loss_backward", &fastpeft::ppo_loss_backward_cuda);
}
