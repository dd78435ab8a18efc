// CPU gae (semantics: csrc/torch_bindings.cpp): rows in parallel, each a sequential reverse scan
// over T in opmath (fp32 for bf16) that skips mask-0 positions (they get 0 and pass the running
// advantage and the next value through; the value after the last valid token is 0).
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/ppo_math.h"
#include "ops.h"

namespace fastpeft {

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards_in, const Tensor& values_in,
                                   const Tensor& mask_in, double gamma, double lam) {
  check_gae_args(rewards_in, values_in, mask_in);
  TORCH_CHECK(rewards_in.device().is_cpu(), "fastpeft: gae_cpu needs CPU tensors, got ",
              rewards_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous();
  const Tensor mask = mask_in.contiguous();
  const int64_t B = rewards.size(0), T_ = rewards.size(1);
  Tensor adv = at::empty({B, T_}, rewards.options());
  Tensor ret = at::empty({B, T_}, rewards.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t *rp = rewards.const_data_ptr<scalar_t>(), *vp = values.const_data_ptr<scalar_t>();
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t *ap = adv.mutable_data_ptr<scalar_t>(), *qp = ret.mutable_data_ptr<scalar_t>();
    // Rows in parallel from 64K elements on (below, the pool's wake-up costs more than the scan).
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(T_, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T_;
        gae_row<T>(rp + o, vp + o, mp + o, T_, T(gamma), T(lam), ap + o, qp + o);
      }
    });
  });
  return {adv, ret};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("gae", &fastpeft::gae_cpu); }
