// CPU linear_cross_entropy and linear_token_logprobs (semantics: csrc/torch_bindings.cpp; the
// chunk loop and its GEMMs: common/linear_cross_entropy.h). What is here is the fused row
// pass over each chunk's logits: at::parallel_for over rows, at::vec over the vocabulary,
// fp32 arithmetic for bf16 (a row is converted into a per-thread fp32 buffer and back).
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "common/linear_cross_entropy.h"
#include "ops.h"

namespace fastpeft {
namespace {

using at::vec::Vectorized;

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vm = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) {
      vm = at::vec::maximum(vm, Vec::loadu(x + i));
    }
    T lanes[Vec::size()];
    vm.store(lanes);
    for (int64_t k = 0; k < Vec::size(); ++k) m = std::max(m, lanes[k]);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// sum_i exp((x_i - m) * s).
template <typename T>
T row_sum_exp(const T* x, int64_t n, T m, T s) {
  using Vec = Vectorized<T>;
  const Vec vm(m), vs(s);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc = acc + ((Vec::loadu(x + i) - vm) * vs).exp();
  }
  T lanes[Vec::size()];
  acc.store(lanes);
  T sum = 0;
  for (int64_t k = 0; k < Vec::size(); ++k) sum += lanes[k];
  for (; i < n; ++i) sum += std::exp((x[i] - m) * s);
  return sum;
}

// x_i <- c * exp(x_i * s - l), in place.
template <typename T>
void row_scaled_softmax(T* x, int64_t n, T s, T l, T c) {
  using Vec = Vectorized<T>;
  const Vec vs(s), vl(l), vc(c);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (vc * (Vec::loadu(x + i) * vs - vl).exp()).store(x + i);
  }
  for (; i < n; ++i) x[i] = c * std::exp(x[i] * s - l);
}

// A row in the accumulation dtype: the row itself (fp32 / fp64) or a converted copy (bf16).
template <typename scalar_t>
struct RowView {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> buf;
  explicit RowView(int64_t V) : buf(kSame ? 0 : V) {}
  acc_t* load(scalar_t* row, int64_t V) {
    if constexpr (kSame) {
      return row;
    } else {
      at::vec::convert(row, buf.data(), V);
      return buf.data();
    }
  }
  void store(scalar_t* row, int64_t V) {
    if constexpr (!kSame) at::vec::convert(buf.data(), row, V);
  }
};

struct CpuRows {
  static void stats(const at::Tensor& z, const at::Tensor& targets, int64_t ignore_index,
                    double inv_temp, at::Tensor& logp, at::Tensor& lse) {
    const int64_t n = z.size(0), V = z.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "lce_stats_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* zp = z.data_ptr<scalar_t>();
      const int64_t* tp = targets.data_ptr<int64_t>();
      acc_t* lp = logp.data_ptr<acc_t>();
      acc_t* ls = lse.data_ptr<acc_t>();
      const acc_t s = static_cast<acc_t>(inv_temp);
      at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
        RowView<scalar_t> view(V);
        for (int64_t r = r0; r < r1; ++r) {
          const acc_t* x = view.load(zp + r * V, V);
          const acc_t m = row_max(x, V);
          const acc_t l = m * s + std::log(row_sum_exp(x, V, m, s));
          ls[r] = l;
          const int64_t t = tp[r];
          lp[r] = (t == ignore_index || t < 0 || t >= V) ? acc_t(0) : x[t] * s - l;
        }
      });
    });
  }

  static void grad(at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& coef, double inv_temp) {
    const int64_t n = z.size(0), V = z.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "lce_grad_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* zp = z.data_ptr<scalar_t>();
      const int64_t* tp = targets.data_ptr<int64_t>();
      const acc_t* ls = lse.data_ptr<acc_t>();
      const acc_t* cp = coef.data_ptr<acc_t>();
      const acc_t s = static_cast<acc_t>(inv_temp);
      at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
        RowView<scalar_t> view(V);
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = zp + r * V;
          const acc_t c = cp[r];
          if (c == acc_t(0)) {  // ignored row (or zero grad_out): no gradient
            std::fill(row, row + V, scalar_t(0));
            continue;
          }
          acc_t* x = view.load(row, V);
          row_scaled_softmax(x, V, s, ls[r], c);
          const int64_t t = tp[r];
          if (t >= 0 && t < V) x[t] -= c;
          view.store(row, V);
        }
      });
    });
  }
};

void check_cpu(const Tensor& hidden, const char* op) {
  TORCH_CHECK(hidden.device().is_cpu(), "fastpeft: ", op, " needs CPU tensors, got hidden on ",
              hidden.device());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_cpu(
    const Tensor& hidden, const Tensor& weight, const Tensor& labels, int64_t ignore_index,
    std::optional<int64_t> chunk_size, std::array<bool, 2> grad_mask) {
  check_cpu(hidden, "linear_cross_entropy_cpu");
  lce::check_args(hidden, weight, labels, "labels", ignore_index);
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::cross_entropy_forward<CpuRows>(hidden.contiguous(), weight.contiguous(),
                                             labels.contiguous(), ignore_index, chunk_size,
                                             grad_mask);
}

std::tuple<Tensor, Tensor> linear_cross_entropy_backward_cpu(const Tensor& grad_loss,
                                                             const Tensor& grad_hidden,
                                                             const Tensor& grad_weight,
                                                             std::array<bool, 2> output_mask) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::cross_entropy_backward(grad_loss, grad_hidden, grad_weight, output_mask);
}

std::tuple<Tensor, Tensor> linear_token_logprobs_cpu(const Tensor& hidden, const Tensor& weight,
                                                     const Tensor& tokens, double temperature,
                                                     std::optional<int64_t> chunk_size) {
  check_cpu(hidden, "linear_token_logprobs_cpu");
  lce::check_args(hidden, weight, tokens, "tokens", std::nullopt);
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::token_logprobs_forward<CpuRows>(hidden.contiguous(), weight.contiguous(),
                                              tokens.contiguous(), temperature, chunk_size);
}

std::tuple<Tensor, Tensor> linear_token_logprobs_backward_cpu(
    const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
    const Tensor& lse, double temperature, std::optional<int64_t> chunk_size,
    std::array<bool, 2> output_mask) {
  check_cpu(hidden, "linear_token_logprobs_backward_cpu");
  lce::check_args(hidden, weight, tokens, "tokens", std::nullopt);
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::token_logprobs_backward<CpuRows>(grad_out.contiguous(), hidden.contiguous(),
                                               weight.contiguous(), tokens.contiguous(), lse,
                                               temperature, chunk_size, output_mask);
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("linear_cross_entropy", &fastpeft::linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &fastpeft::linear_cross_entropy_backward_cpu);
  m.impl("linear_token_logprobs", &fastpeft::linear_token_logprobs_cpu);
  m.impl("linear_token_logprobs_backward", &fastpeft::linear_token_logprobs_backward_cpu);
}
