// CPU linear_cross_entropy and linear_token_logprobs (semantics: csrc/torch_bindings.cpp; the
// chunk loop and its GEMMs: common/linear_cross_entropy.h). What is here is the fused row
// pass over each chunk's logits: at::parallel_for over rows, 64-byte vectors (per-ISA clones)
// over the vocabulary, fp32 arithmetic for bf16 (a row is converted into a per-thread fp32
// buffer and back).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/linear_cross_entropy.h"
#include "cpu/vec64.h"
#include "ops.h"

namespace fastpeft {
namespace {

// The fp32 row passes: 64-byte vectors per ISA clone (the extension is built without -mavx*,
// so ATen's Vectorized would be scalar here), cpu/vec64.h's.
using VF = vec64::Vec<float>;
using vec64::vexp;
constexpr int64_t kW = 16;

__attribute__((always_inline)) inline VF load16(const float* p) { return vec64::load64(p); }
__attribute__((always_inline)) inline void store16(float* p, VF v) { vec64::store64(p, v); }

FASTPEFT_CPU_CLONES float row_max_f32(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= kW) {
    VF vm = load16(x);
    for (i = kW; i + kW <= n; i += kW) {
      const VF v = load16(x + i);
      vm = v > vm ? v : vm;
    }
    for (int k = 0; k < kW; ++k) m = std::max(m, vm[k]);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

FASTPEFT_CPU_CLONES float row_sum_exp_f32(const float* x, int64_t n, float m, float s) {
  VF acc = VF{};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += vexp((load16(x + i) - m) * s);
  float sum = 0;
  for (int k = 0; k < kW; ++k) sum += acc[k];
  for (; i < n; ++i) sum += std::exp((x[i] - m) * s);
  return sum;
}

FASTPEFT_CPU_CLONES void row_scaled_softmax_f32(float* x, int64_t n, float s, float l, float c) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store16(x + i, c * vexp(load16(x + i) * s - l));
  for (; i < n; ++i) x[i] = c * std::exp(x[i] * s - l);
}

// fp64 (the testing dtype): plain loops.
double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
double row_sum_exp(const double* x, int64_t n, double m, double s) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp((x[i] - m) * s);
  return sum;
}
void row_scaled_softmax(double* x, int64_t n, double s, double l, double c) {
  for (int64_t i = 0; i < n; ++i) x[i] = c * std::exp(x[i] * s - l);
}
float row_max(const float* x, int64_t n) { return row_max_f32(x, n); }
float row_sum_exp(const float* x, int64_t n, float m, float s) {
  return row_sum_exp_f32(x, n, m, s);
}
void row_scaled_softmax(float* x, int64_t n, float s, float l, float c) {
  row_scaled_softmax_f32(x, n, s, l, c);
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
      for (int64_t i = 0; i < V; ++i) buf[i] = static_cast<acc_t>(row[i]);
      return buf.data();
    }
  }
  void store(scalar_t* row, int64_t V) {
    if constexpr (!kSame) {
      for (int64_t i = 0; i < V; ++i) row[i] = static_cast<scalar_t>(buf[i]);
    }
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
