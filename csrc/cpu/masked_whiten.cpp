// CPU masked_whiten (semantics: csrc/torch_bindings.cpp): two reductions over the masked
// entries in double (count and sum, then the centred sum of squares), then one elementwise pass.
// The backward: y = (x - mu) s (+ mu), s = rsqrt(var + eps), var = sum_m (x - mu)^2 / d:
//   dx_j = g_j s + m_j [ (1/n) (sum g) (shift ? -s : 1 - s) - s^3 / d (x_j - mu) sum g (x - mu) ]
// (the mean's path through var vanishes: sum_m (x - mu) = 0).
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/ppo_math.h"
#include "cpu/chunked_sum.h"
#include "ops.h"

namespace fastpeft {

constexpr double kWhitenEps = 1e-8;

std::tuple<Tensor, Tensor> masked_whiten_cpu(const Tensor& x_in, const Tensor& mask_in,
                                             bool shift_mean) {
  check_whiten_args(x_in, mask_in);
  TORCH_CHECK(x_in.device().is_cpu(), "fastpeft: masked_whiten_cpu needs CPU tensors, got ",
              x_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor x = x_in.contiguous(), mask = mask_in.contiguous();
  const int64_t N = x.numel();
  Tensor out = at::empty({N}, x.options());
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor stats = at::empty({4}, x.options().dtype(stats_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "masked_whiten_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const auto s1 = chunked_sum<2>(N, [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
      for (int64_t i = b; i < e; ++i)
        if (mp[i]) {
          acc[0] += 1.0;
          acc[1] += static_cast<double>(xp[i]);
        }
    });
    const double n = s1[0];
    const double inv_n = 1.0 / std::max(n, 1.0), inv_d = 1.0 / std::max(n - 1.0, 1.0);
    const double mean = s1[1] * inv_n;
    const auto s2 = chunked_sum<1>(N, [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
      for (int64_t i = b; i < e; ++i)
        if (mp[i]) {
          const double c = static_cast<double>(xp[i]) - mean;
          acc[0] += c * c;
        }
    });
    const double rstd = 1.0 / std::sqrt(s2[0] * inv_d + kWhitenEps);
    const T m = T(mean), r = T(rstd), add = shift_mean ? T(0) : T(mean);
    at::parallel_for(0, N, kSumChunk, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) yp[i] = static_cast<scalar_t>((T(xp[i]) - m) * r + add);
    });
    using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    S* sp = stats.mutable_data_ptr<S>();
    sp[0] = S(mean);
    sp[1] = S(rstd);
    sp[2] = S(inv_n);
    sp[3] = S(inv_d);
  });
  return {out, stats};
}

Tensor masked_whiten_backward_cpu(const Tensor& grad_in, const Tensor& x_in, const Tensor& mask_in,
                                  const Tensor& stats_in, bool shift_mean) {
  check_whiten_backward_args(grad_in, x_in, mask_in, stats_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), mask = mask_in.contiguous();
  const Tensor stats = stats_in.to(at::kDouble);
  const int64_t N = x.numel();
  Tensor dx = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "masked_whiten_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const double* st = stats.const_data_ptr<double>();
    const double mean = st[0], s = st[1], inv_n = st[2], inv_d = st[3];
    const auto sums = chunked_sum<2>(N, [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
      for (int64_t i = b; i < e; ++i) {
        const double gi = static_cast<double>(gp[i]);
        acc[0] += gi;
        acc[1] += gi * (static_cast<double>(xp[i]) - mean);
      }
    });
    const T a = T(inv_n * sums[0] * (shift_mean ? -s : 1.0 - s));
    const T c = T(s * s * s * inv_d * sums[1]);
    const T sT = T(s), mT = T(mean);
    at::parallel_for(0, N, kSumChunk, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T d = T(gp[i]) * sT;
        if (mp[i]) d += a - c * (T(xp[i]) - mT);
        dp[i] = static_cast<scalar_t>(d);
      }
    });
  });
  return dx;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("masked_whiten", &fastpeft::masked_whiten_cpu);
  m.impl("masked_whiten_backward", &fastpeft::masked_whiten_backward_cpu);
}
