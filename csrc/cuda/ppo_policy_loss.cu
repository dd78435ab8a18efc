// CUDA ppo_policy_loss (semantics: csrc/torch_bindings.cpp, common/ppo_math.h): the mask count
// (at::sum, stays on the device), one grid-stride pass writing d loss / d logprobs (already
// divided by the count) and per-block partial sums of the loss and the stats, a fixed-order
// reduction of the partials, and a one-thread epilogue writing loss and stats.
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
__global__ void policy_loss_kernel(const scalar_t* __restrict__ lp,
                                   const scalar_t* __restrict__ old,
                                   const scalar_t* __restrict__ adv,
                                   const scalar_t* __restrict__ ref,
                                   const bool* __restrict__ mask, const int64_t* count, int64_t N,
                                   double clip_low, double clip_high, double kl_coef,
                                   KlEstimator est, scalar_t* __restrict__ grad,
                                   at::opmath_type<scalar_t>* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = *count;
  const acc_t inv = n > 0 ? acc_t(1) / acc_t(n) : acc_t(0);
  const acc_t cl = acc_t(clip_low), ch = acc_t(clip_high), kc = acc_t(kl_coef);
  acc_t s[5] = {0, 0, 0, 0, 0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += stride) {
    if (!mask[i]) {
      grad[i] = scalar_t(0);
      continue;
    }
    const acc_t r = ref != nullptr ? acc_t(ref[i]) : acc_t(0);
    const auto p = policy_token<acc_t>(acc_t(lp[i]), acc_t(old[i]), acc_t(adv[i]), r, cl, ch, kc,
                                       est);
    grad[i] = static_cast<scalar_t>(p.dterm * inv);
    s[0] += p.term;
    s[1] += p.clipped ? acc_t(1) : acc_t(0);
    s[2] += p.diff * p.diff;
    s[3] += p.ratio;
    s[4] += p.kl;
  }
  masked_reduce::block_sum<5, acc_t>(s);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 5; ++k) partials[blockIdx.x * 5 + k] = s[k];
  }
}

template <typename scalar_t>
__global__ void policy_loss_epilogue(const double* totals, const int64_t* count, scalar_t* loss,
                                     scalar_t* stats) {
  const int64_t n = *count;
  const double inv = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  loss[0] = static_cast<scalar_t>(totals[0] * inv);
  stats[0] = static_cast<scalar_t>(totals[1] * inv);
  stats[1] = static_cast<scalar_t>(0.5 * totals[2] * inv);
  stats[2] = static_cast<scalar_t>(totals[3] * inv);
  stats[3] = static_cast<scalar_t>(totals[4] * inv);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_cuda(
    const Tensor& logprobs_in, const Tensor& old_in, const Tensor& adv_in, const Tensor& mask_in,
    const std::optional<Tensor>& ref_in, double clip_low, double clip_high, double kl_coef,
    c10::string_view kl_estimator) {
  check_cuda_input(logprobs_in, "ppo_policy_loss");
  check_policy_loss_args(logprobs_in, old_in, adv_in, mask_in, ref_in);
  const KlEstimator est = parse_kl_estimator(
      std::string_view(kl_estimator.data(), kl_estimator.size()), ref_in.has_value());
  c10::cuda::CUDAGuard device_guard(logprobs_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor logprobs = logprobs_in.contiguous(), old = old_in.contiguous();
  const Tensor adv = adv_in.contiguous(), mask = mask_in.contiguous();
  const Tensor ref = ref_in.has_value() ? ref_in->contiguous() : Tensor();
  const int64_t N = logprobs.numel();
  Tensor grad = at::empty({N}, logprobs.options());
  Tensor loss = at::empty({}, logprobs.options());
  Tensor stats = at::empty({4}, logprobs.options());
  const Tensor count = at::sum(mask, at::kLong);
  const int blocks = masked_reduce::blocks_for(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(),
                                  "fastpeft_ppo_policy_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor partials = at::empty({blocks, 5}, logprobs.options().dtype(
                                                 c10::CppTypeToScalarType<acc_t>::value));
    policy_loss_kernel<scalar_t><<<blocks, masked_reduce::kThreads, 0, stream>>>(
        logprobs.const_data_ptr<scalar_t>(), old.const_data_ptr<scalar_t>(),
        adv.const_data_ptr<scalar_t>(), ref.defined() ? ref.const_data_ptr<scalar_t>() : nullptr,
        mask.const_data_ptr<bool>(), count.const_data_ptr<int64_t>(), N, clip_low, clip_high,
        kl_coef, est, grad.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor totals = masked_reduce::reduce_partials<5, acc_t>(partials, blocks, stream);
    policy_loss_epilogue<scalar_t><<<1, 1, 0, stream>>>(
        totals.const_data_ptr<double>(), count.const_data_ptr<int64_t>(),
        loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, grad};
}

Tensor ppo_loss_backward_cuda(const Tensor& grad_loss, const Tensor& grad) {
  check_loss_backward_args(grad_loss, grad);
  c10::cuda::CUDAGuard device_guard(grad.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::mul(grad, grad_loss.reshape({}));
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("ppo_policy_loss", &fastpeft::ppo_policy_loss_cuda);
  m.impl("ppo_policy_loss_backward", &fastpeft::ppo_loss_backward_cuda);
}
