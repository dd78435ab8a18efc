// CPU ia3_linear forward and backward (semantics: csrc/torch_bindings.cpp, csrc/ops.h).
//
// The GEMMs go to ATen (MKL / oneDNN, all threads) on x, W and grad_out as given. The IA3
// vector l is applied where it costs least, and never to a copy of x:
//  - folded into a transient copy of W (scaled over K or N) when M is large: that pass over
//    W costs about 1/M of the GEMM;
//  - for a few rows (M * width <= kSmallBuffer), into a small buffer of scaled rows;
//  - or on a GEMM's output, in one parallel pass that also forms the column sums grad_scale
//    needs (per-thread partial sums, reduced at the end).
// The elementwise passes compute in the accumulation type (fp32 for bf16, fp64 for fp64).
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/ia3_linear_checks.h"
#include "cpu/row_reduce.h"
#include "ops.h"

namespace fastpeft {
namespace {

using cpu::opmath_vector;
using cpu::parallel_column_sums;
using cpu::pass_grain;
using cpu::vector_to_tensor;

// Up to this many elements a scaled copy of a few rows of x (or grad_out) is a small buffer
// (256 KB in fp32), cheaper than scaling all of W when M is this small.
constexpr int64_t kSmallBuffer = 1 << 16;

Tensor affine(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

// dst [rows, cols] = src * l[None, :] (by_col, l [cols]) or src * l[:, None] (l [rows]);
// dst may be src.
template <typename scalar_t, typename op_t>
void scale_matrix(const Tensor& src, const op_t* l, bool by_col, Tensor& dst) {
  const int64_t rows = src.size(0), cols = src.size(1);
  const scalar_t* S = src.data_ptr<scalar_t>();
  scalar_t* D = dst.data_ptr<scalar_t>();
  at::parallel_for(0, rows, pass_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* s = S + r * cols;
      scalar_t* d = D + r * cols;
      if (by_col) {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(static_cast<op_t>(s[c]) * l[c]);
      } else {
        const op_t f = l[r];
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(static_cast<op_t>(s[c]) * f);
      }
    }
  });
}

template <typename scalar_t, typename op_t>
Tensor scaled(const Tensor& src, const op_t* l, bool by_col) {
  Tensor dst = at::empty_like(src);
  scale_matrix<scalar_t, op_t>(src, l, by_col, dst);
  return dst;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias, const Tensor& scale,
                                        bool scale_input, bool keep_unscaled) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const std::vector<op_t> l = opmath_vector<op_t, scalar_t>(scale);
  Tensor unscaled = x.new_empty({0});
  Tensor y;
  if (scale_input) {
    // y = (x * l) W^T + b = x (W * l[None, :])^T + b.
    if (M * K <= kSmallBuffer) {
      y = affine(scaled<scalar_t>(x, l.data(), /*by_col=*/true), weight, bias);
    } else {
      y = affine(x, scaled<scalar_t>(weight, l.data(), /*by_col=*/true), bias);
    }
  } else if (keep_unscaled) {
    // unscaled = x W^T + b (kept for grad_scale); y = unscaled * l[None, :].
    unscaled = affine(x, weight, bias);
    y = scaled<scalar_t>(unscaled, l.data(), /*by_col=*/true);
  } else if (M > K) {
    // y = x (l[:, None] * W)^T + l * b: scaling W (N x K) is cheaper than scaling y (M x N).
    std::optional<Tensor> bias_l;
    if (bias.has_value()) {
      bias_l = bias->view({1, N}).clone();
      scale_matrix<scalar_t, op_t>(*bias_l, l.data(), /*by_col=*/true, *bias_l);
      bias_l = bias_l->view({N});
    }
    y = affine(x, scaled<scalar_t>(weight, l.data(), /*by_col=*/false), bias_l);
  } else {
    y = affine(x, weight, bias);
    scale_matrix<scalar_t, op_t>(y, l.data(), /*by_col=*/true, y);
  }
  return {y, unscaled};
}

// scale_input, given gW = grad_out W [M, K] (the gradient of x * l): returns
// grad_scale = sum_rows(x * gW) and, when write_grad_x, turns gW into grad_x = gW * l in the
// same pass over [M, K].
template <typename scalar_t, typename op_t>
std::vector<op_t> scale_input_pass(Tensor& gw, const Tensor& x, const op_t* l,
                                   bool write_grad_x) {
  const int64_t M = gw.size(0), K = gw.size(1);
  scalar_t* GW = gw.data_ptr<scalar_t>();
  const scalar_t* X = x.data_ptr<scalar_t>();
  return parallel_column_sums<op_t>(M, K, pass_grain(K), [&](int64_t m0, int64_t m1, op_t* acc) {
    for (int64_t m = m0; m < m1; ++m) {
      scalar_t* g = GW + m * K;
      const scalar_t* xr = X + m * K;
      if (write_grad_x) {
        for (int64_t k = 0; k < K; ++k) {
          const op_t v = static_cast<op_t>(g[k]);
          acc[k] += static_cast<op_t>(xr[k]) * v;
          g[k] = static_cast<scalar_t>(v * l[k]);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) acc[k] += static_cast<op_t>(xr[k]) * static_cast<op_t>(g[k]);
      }
    }
  });
}

// Column sums of grad_out [M, N] in one pass: [sum_rows(g * u) when u, sum_rows(g) when
// with_sum], concatenated.
template <typename scalar_t, typename op_t>
std::vector<op_t> grad_out_column_sums(const Tensor& g, const Tensor* u, bool with_sum) {
  const int64_t M = g.size(0), N = g.size(1);
  const scalar_t* G = g.data_ptr<scalar_t>();
  // (Flags, not data pointers: an empty tensor's data pointer may be null.)
  const bool with_prod = u != nullptr;
  const scalar_t* U = with_prod ? u->data_ptr<scalar_t>() : nullptr;
  const int64_t width = (with_prod ? N : 0) + (with_sum ? N : 0);
  return parallel_column_sums<op_t>(M, width, pass_grain(N), [&](int64_t m0, int64_t m1,
                                                                  op_t* acc) {
    op_t* prod = acc;
    op_t* sum = acc + (with_prod ? N : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const scalar_t* gr = G + m * N;
      if (with_prod) {
        const scalar_t* ur = U + m * N;
        for (int64_t n = 0; n < N; ++n) prod[n] += static_cast<op_t>(gr[n]) * static_cast<op_t>(ur[n]);
      }
      if (with_sum)
        for (int64_t n = 0; n < N; ++n) sum[n] += static_cast<op_t>(gr[n]);
    }
  });
}

template <typename scalar_t>
Grads4 backward_impl(const Tensor& g, const Tensor& x, const Tensor& weight,
                     const std::optional<Tensor>& bias, const Tensor& scale,
                     const Tensor& unscaled, bool scale_input, std::array<bool, 4> mask) {
  using op_t = at::opmath_type<scalar_t>;
  const bool need_gx = mask[0], need_gw = mask[1], need_gb = mask[2], need_gl = mask[3];
  const int64_t M = g.size(0), N = g.size(1), K = weight.size(1);
  const std::vector<op_t> l = opmath_vector<op_t, scalar_t>(scale);
  const auto opts = g.options();
  // A masked-off output is its own empty tensor (outputs of an op must not alias).
  Tensor grad_x = g.new_empty({0}), grad_w = g.new_empty({0}), grad_b = g.new_empty({0});
  Tensor grad_l = g.new_empty({0});

  if (scale_input) {
    if (need_gl) {
      // gW = g W, then one pass: grad_scale = sum_rows(x * gW), grad_x = gW * l (in place).
      Tensor gw = at::mm(g, weight);
      grad_l = vector_to_tensor(scale_input_pass<scalar_t, op_t>(gw, x, l.data(), need_gx), opts);
      if (need_gx) grad_x = gw;
    } else if (need_gx) {
      // grad_x = g (W * l[None, :]) or (g W) * l, whichever scales fewer elements.
      if (N < M) {
        grad_x = at::mm(g, scaled<scalar_t>(weight, l.data(), /*by_col=*/true));
      } else {
        grad_x = at::mm(g, weight);
        scale_matrix<scalar_t, op_t>(grad_x, l.data(), /*by_col=*/true, grad_x);
      }
    }
    if (need_gw) {
      // grad_weight = g^T (x * l) = (g^T x) * l[None, :].
      grad_w = at::mm(g.t(), x);
      scale_matrix<scalar_t, op_t>(grad_w, l.data(), /*by_col=*/true, grad_w);
    }
    if (need_gb)
      grad_b = vector_to_tensor(grad_out_column_sums<scalar_t, op_t>(g, nullptr, true), opts);
    return {grad_x, grad_w, grad_b, grad_l};
  }

  // !scale_input: gs = g * l[None, :] is never formed for large M.
  if (need_gx) {
    if (M * N <= kSmallBuffer) {
      grad_x = at::mm(scaled<scalar_t>(g, l.data(), /*by_col=*/true), weight);
    } else {
      grad_x = at::mm(g, scaled<scalar_t>(weight, l.data(), /*by_col=*/false));
    }
  }
  const bool has_unscaled = ia3_has_unscaled(unscaled);
  Tensor G;  // g^T x [N, K], when formed
  std::vector<op_t> colsum;  // sum_rows(g), when needed
  const bool need_colsum = need_gb || (need_gl && !has_unscaled && bias.has_value());
  if (need_gl && has_unscaled) {
    // grad_scale = sum_rows(g * unscaled), with sum_rows(g) from the same pass.
    std::vector<op_t> sums = grad_out_column_sums<scalar_t, op_t>(g, &unscaled, need_colsum);
    if (need_colsum) colsum.assign(sums.begin() + N, sums.end());
    sums.resize(static_cast<size_t>(N));
    grad_l = vector_to_tensor(sums, opts);
  } else {
    if (need_colsum) colsum = grad_out_column_sums<scalar_t, op_t>(g, nullptr, true);
    if (need_gl) {
      // grad_scale[n] = sum_k G[n, k] W[n, k] + b[n] sum_rows(g)[n]  (G = g^T x).
      G = at::mm(g.t(), x);
      const scalar_t* Gp = G.data_ptr<scalar_t>();
      const scalar_t* Wp = weight.data_ptr<scalar_t>();
      const bool has_bias = bias.has_value();
      const scalar_t* Bp = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
      std::vector<op_t> gl(static_cast<size_t>(N));
      at::parallel_for(0, N, pass_grain(K), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          op_t acc = has_bias ? static_cast<op_t>(Bp[n]) * colsum[n] : op_t(0);
          for (int64_t k = 0; k < K; ++k)
            acc += static_cast<op_t>(Gp[n * K + k]) * static_cast<op_t>(Wp[n * K + k]);
          gl[n] = acc;
        }
      });
      grad_l = vector_to_tensor(gl, opts);
    }
  }
  if (need_gb) {
    // grad_bias = sum_rows(g * l) = l * sum_rows(g).
    for (int64_t n = 0; n < N; ++n) colsum[n] *= l[n];
    grad_b = vector_to_tensor(colsum, opts);
  }
  if (need_gw) {
    // grad_weight = (g * l)^T x = l[:, None] * G (G reused when grad_scale formed it).
    if (!G.defined()) G = at::mm(g.t(), x);
    scale_matrix<scalar_t, op_t>(G, l.data(), /*by_col=*/false, G);
    grad_w = G;
  }
  return {grad_x, grad_w, grad_b, grad_l};
}

}  // namespace

std::tuple<Tensor, Tensor> ia3_linear_cpu(const Tensor& x_in, const Tensor& weight_in,
                                          const std::optional<Tensor>& bias_in,
                                          const Tensor& scale_in, bool scale_input,
                                          bool keep_unscaled) {
  check_ia3_linear_args(x_in, weight_in, bias_in, scale_in, scale_input);
  // The ATen calls below are the kernel's own work: no autograd recording (the backward op is
  // called with grad mode on under create_graph, and out= calls refuse inputs needing grad).
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x_in.device().is_cpu(), "fastpeft: ia3_linear_cpu needs CPU tensors, got x on ",
              x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous();
  std::optional<Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "ia3_linear_cpu", [&] {
    out = forward_impl<scalar_t>(x, weight, bias, scale, scale_input, keep_unscaled);
  });
  return out;
}

Grads4 ia3_linear_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                               const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                               const Tensor& scale_in, const Tensor& unscaled_in,
                               bool scale_input, std::array<bool, 4> output_mask) {
  const bool has_unscaled = ia3_has_unscaled(unscaled_in);
  check_ia3_linear_backward_args(grad_out_in, x_in, weight_in, scale_in, unscaled_in,
                                 scale_input, output_mask[1], output_mask[3]);
  // The ATen calls below are the kernel's own work: no autograd recording (the backward op is
  // called with grad mode on under create_graph, and out= calls refuse inputs needing grad).
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(grad_out_in.device().is_cpu(),
              "fastpeft: ia3_linear_backward_cpu needs CPU tensors, got grad_out on ",
              grad_out_in.device());
  check_optional_vector(grad_out_in, bias_in, weight_in.size(0), "bias", "out_features");
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous();
  const Tensor unscaled = has_unscaled ? unscaled_in.contiguous() : unscaled_in;
  std::optional<Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  Grads4 grads;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(),
                                 "ia3_linear_backward_cpu", [&] {
    grads = backward_impl<scalar_t>(grad_out, x, weight, bias, scale, unscaled, scale_input,
                                    output_mask);
  });
  return grads;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("ia3_linear", &fastpeft::ia3_linear_cpu);
  m.impl("ia3_linear_backward", &fastpeft::ia3_linear_backward_cpu);
}
