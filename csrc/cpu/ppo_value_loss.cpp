// CPU ppo_value_loss (semantics: csrc/torch_bindings.cpp, common/ppo_math.h): one pass computes
// the loss, vf_clipfrac and d loss / d values (the mask count first, so the gradient is
// written already scaled).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/ppo_math.h"
#include "cpu/chunked_sum.h"
#include "ops.h"

namespace fastpeft {

std::tuple<Tensor, Tensor, Tensor> ppo_value_loss_cpu(const Tensor& values_in,
                                                      const Tensor& old_in, const Tensor& ret_in,
                                                      const Tensor& mask_in, double clip) {
  check_value_loss_args(values_in, old_in, ret_in, mask_in);
  TORCH_CHECK(values_in.device().is_cpu(), "fastpeft: ppo_value_loss_cpu needs CPU tensors, got ",
              values_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor values = values_in.contiguous(), old = old_in.contiguous();
  const Tensor ret = ret_in.contiguous(), mask = mask_in.contiguous();
  const int64_t N = values.numel();
  Tensor grad = at::empty({N}, values.options());
  Tensor loss = at::empty({}, values.options());
  Tensor stats = at::empty({1}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, values.scalar_type(), "ppo_value_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t *vp = values.const_data_ptr<scalar_t>(), *op = old.const_data_ptr<scalar_t>();
    const scalar_t* rp = ret.const_data_ptr<scalar_t>();
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = count_true(mp, N);
    const T inv = n > 0 ? T(1) / T(n) : T(0);
    const auto s = chunked_sum<2>(N, [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
      double term = 0, clipped = 0;  // in registers, not re-read around the stores to gp
      for (int64_t i = b; i < e; ++i) {
        if (!mp[i]) {
          gp[i] = scalar_t(0);
          continue;
        }
        const auto p = value_token<T>(T(vp[i]), T(op[i]), T(rp[i]), T(clip));
        gp[i] = static_cast<scalar_t>(p.dterm * inv);
        term += p.term;
        clipped += p.clipped ? 1.0 : 0.0;
      }
      acc = {term, clipped};
    });
    const double dinv = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
    loss.fill_(0.5 * s[0] * dinv);
    stats.fill_(s[1] * dinv);
  });
  return {loss, stats, grad};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("ppo_value_loss", &fastpeft::ppo_value_loss_cpu);
  m.impl("ppo_value_loss_backward", &fastpeft::ppo_loss_backward_cpu);
}
