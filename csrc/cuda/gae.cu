// CUDA gae (semantics: csrc/torch_bindings.cpp): one thread per row, a sequential reverse scan
// over T in opmath (fp32 for bf16 / fp16), mask-0 positions skipped (0 out, the running
// advantage and next value passed through). The loads of a step do not depend on the previous
// step, so they overlap; only the two fused multiply-adds form the serial chain.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/ppo_math.h"
#include "ops.h"

namespace fastpeft {
namespace {

constexpr int kGaeThreads = 64;

template <typename scalar_t>
__global__ void gae_kernel(const scalar_t* __restrict__ rewards,
                           const scalar_t* __restrict__ values, const bool* __restrict__ mask,
                           int64_t B, int64_t T, double gamma, double lam,
                           scalar_t* __restrict__ adv, scalar_t* __restrict__ ret) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  gae_row<acc_t>(rewards + o, values + o, mask + o, T, acc_t(gamma), acc_t(lam), adv + o,
                 ret + o);
}

}  // namespace

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards_in, const Tensor& values_in,
                                    const Tensor& mask_in, double gamma, double lam) {
  check_cuda_input(rewards_in, "gae");
  check_gae_args(rewards_in, values_in, mask_in);
  c10::cuda::CUDAGuard device_guard(rewards_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous();
  const Tensor mask = mask_in.contiguous();
  const int64_t B = rewards.size(0), T = rewards.size(1);
  Tensor adv = at::empty({B, T}, rewards.options());
  Tensor ret = at::empty({B, T}, rewards.options());
  if (B == 0 || T == 0) return {adv, ret};
  const int blocks = static_cast<int>((B + kGaeThreads - 1) / kGaeThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "fastpeft_gae",
                                  [&] {
    gae_kernel<scalar_t><<<blocks, kGaeThreads, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
        mask.const_data_ptr<bool>(), B, T, gamma, lam, adv.mutable_data_ptr<scalar_t>(),
        ret.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {adv, ret};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("gae", &fastpeft::gae_cuda); }
