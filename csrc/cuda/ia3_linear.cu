// CUDA implementation of fastpeft::ia3_linear and its backward (semantics: csrc/torch_bindings.cpp).
//
// Forward, l = scale:
//   scale_input:  W' = W * l[None, :]  (one colwise pass into a transient [N, K]; x is never
//                 scaled), y = addmm(b, x, W'^T)                          cuBLAS
//   else:         y_pre = addmm(b, x, W^T) (cuBLAS), then one colwise pass y = y_pre * l[None, :]
//                 (in place unless keep_unscaled, which returns y_pre as `unscaled`)
// Backward, g = grad_out:
//   scale_input:  gW = g W (cuBLAS), then ONE colwise pass writing grad_x = gW * l in place and
//                 reducing grad_scale = sum_rows(x * gW); grad_weight = (g^T x) * l[None, :]
//                 (cuBLAS + an in-place colwise pass); grad_bias = sum_rows(g)
//   else:         ONE colwise pass writing gs = g * l and reducing sum_rows(g * unscaled) (when
//                 unscaled is given); grad_x = gs W, grad_bias = sum_rows(gs) and either
//                 grad_weight = gs^T x, or, when grad_scale must come from x:
//                 G = g^T x (cuBLAS), then one rowdot pass: grad_scale = rowsum(G * W)
//                 + bias * sum_rows(g), G *= l[:, None] in place -> grad_weight (one GEMM for both)
// Column sums are two-stage (per-chunk partials, then at::sum): deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/ia3_linear_checks.h"
#include "cuda/colwise.cuh"
#include "ops.h"

namespace fastpeft {

namespace {

// out[m, c] = in[m, c] * l[c] (out may be `in` itself, or nullptr: no write); returns the column
// contribution b[m, c] * in[m, c] (0 when b is nullptr).
template <typename scalar_t>
struct ScaleColumns {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  const scalar_t* l;
  scalar_t* out;
  const scalar_t* b;
  __device__ __forceinline__ acc_t operator()(int64_t, int64_t c, int64_t i) const {
    const acc_t v = static_cast<acc_t>(in[i]);
    if (out != nullptr) out[i] = static_cast<scalar_t>(v * static_cast<acc_t>(l[c]));
    return b != nullptr ? v * static_cast<acc_t>(b[i]) : acc_t(0);
  }
};

// Runs ScaleColumns over [M, C] (all pointers into contiguous tensors of dtype `t`'s). Returns
// the column sums of b * in in `t`'s dtype ([C]) when b is given, else an undefined tensor.
at::Tensor scale_columns(const at::Tensor& in, const at::Tensor& l, at::Tensor* out,
                         const at::Tensor* b) {
  const int64_t M = in.size(0), C = in.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(),
                                  "fastpeft_ia3_scale_columns", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ScaleColumns<scalar_t> fn{in.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                                    out != nullptr ? out->mutable_data_ptr<scalar_t>() : nullptr,
                                    b != nullptr ? b->const_data_ptr<scalar_t>() : nullptr};
    at::Tensor part = colwise::launch<acc_t>(fn, M, C, b != nullptr, in.options(), stream);
    if (b != nullptr) sums = part.sum(0).to(in.scalar_type());
  });
  return sums;
}

}  // namespace

std::tuple<Tensor, Tensor> ia3_linear_cuda(const Tensor& x_in, const Tensor& weight_in,
                                           const std::optional<Tensor>& bias_in,
                                           const Tensor& scale_in, bool scale_input,
                                           bool keep_unscaled) {
  check_cuda_input(x_in, "ia3_linear");
  check_ia3_linear_args(x_in, weight_in, bias_in, scale_in, scale_input);
  c10::cuda::CUDAGuard device_guard(x_in.device());

  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous();
  std::optional<Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const Tensor none = x.new_empty({0});

  if (scale_input) {
    // (x * l) W^T == x (W * l[None, :])^T: scale the transient weight copy, never x.
    Tensor w_scaled = at::empty_like(weight, at::MemoryFormat::Contiguous);
    scale_columns(weight, scale, &w_scaled, nullptr);
    Tensor y = bias ? at::addmm(*bias, x, w_scaled.t()) : at::mm(x, w_scaled.t());
    return {y, none};
  }

  Tensor y_pre = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());  // [M, N]
  const bool keep = keep_unscaled;
  Tensor y = keep ? at::empty_like(y_pre, at::MemoryFormat::Contiguous) : y_pre;
  scale_columns(y_pre, scale, &y, nullptr);  // in place when not kept
  return {y, keep ? y_pre : none};
}

Grads4 ia3_linear_backward_cuda(const Tensor& grad_out_in, const Tensor& x_in,
                                const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                                const Tensor& scale_in, const Tensor& unscaled_in,
                                bool scale_input, std::array<bool, 4> output_mask) {
  check_cuda_input(grad_out_in, "ia3_linear");
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2],
             need_l = output_mask[3];
  check_ia3_linear_backward_args(grad_out_in, x_in, weight_in, scale_in, unscaled_in,
                                 scale_input, need_w, need_l);
  const int64_t N = weight_in.size(0);
  check_optional_vector(grad_out_in, bias_in, N, "bias", "out_features");
  c10::cuda::CUDAGuard device_guard(grad_out_in.device());

  const Tensor g = grad_out_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous();
  const bool has_unscaled = ia3_has_unscaled(unscaled_in);
  const Tensor x = x_in.dim() == 2 ? x_in.contiguous() : x_in;  // 1-D empty when not kept
  const Tensor unscaled = has_unscaled ? unscaled_in.contiguous() : unscaled_in;
  // Outputs not asked for are 1-D empty tensors, each its own (outputs must not alias).
  auto none = [&] { return g.new_empty({0}); };
  Tensor grad_x = none(), grad_weight = none(), grad_bias = none(), grad_scale = none();

  if (scale_input) {
    if (need_x || need_l) {
      Tensor gW = at::mm(g, weight);  // [M, K]
      // One pass: grad_x = gW * l in place, grad_scale = sum_rows(x * gW) from the unscaled gW.
      Tensor sums = scale_columns(gW, scale, need_x ? &gW : nullptr, need_l ? &x : nullptr);
      if (need_x) grad_x = gW;
      if (need_l) grad_scale = sums;
    }
    if (need_w) {
      grad_weight = at::mm(g.t(), x);  // [N, K]
      scale_columns(grad_weight, scale, &grad_weight, nullptr);  // * l[None, :], in place
    }
    if (need_b) grad_bias = g.sum(0);
    return {grad_x, grad_weight, grad_bias, grad_scale};
  }

  // scale_input = False: y = (x W^T + b) * l.
  const bool scale_from_x = need_l && !has_unscaled;  // G = g^T x gives grad_scale and grad_weight
  const bool need_gs = need_x || need_b || (need_w && !scale_from_x);
  const bool scale_from_unscaled = need_l && has_unscaled;
  Tensor gs;  // g * l[None, :]
  if (need_gs) gs = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (need_gs || scale_from_unscaled) {
    Tensor sums = scale_columns(g, scale, need_gs ? &gs : nullptr,
                                scale_from_unscaled ? &unscaled : nullptr);
    if (scale_from_unscaled) grad_scale = sums;
  }
  if (need_x) grad_x = at::mm(gs, weight);  // [M, K]
  if (need_b) grad_bias = gs.sum(0);
  if (scale_from_x) {
    Tensor G = at::mm(g.t(), x);  // [N, K]
    grad_scale = at::empty({N}, g.options());
    const auto acc_dtype = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor g_sum;  // sum_rows(g) [N] in the accumulation dtype, for the bias term
    if (bias_in.has_value()) g_sum = at::sum(g, {0}, /*keepdim=*/false, acc_dtype);
    const Tensor bias = bias_in.has_value() ? bias_in->contiguous() : Tensor();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(),
                                    "fastpeft_ia3_linear_backward_rowdot", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // grad_scale[n] = sum_k G[n, k] W[n, k] + b[n] sum_rows(g)[n]; then G[n, :] *= l[n].
      colwise::launch_rowdot<scalar_t>(
          G.mutable_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          need_w ? scale.const_data_ptr<scalar_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          g_sum.defined() ? g_sum.const_data_ptr<acc_t>() : nullptr,
          grad_scale.mutable_data_ptr<scalar_t>(), N, weight.size(1), stream);
    });
    if (need_w) grad_weight = G;
  } else if (need_w) {
    grad_weight = at::mm(gs.t(), x);  // [N, K]
  }
  return {grad_x, grad_weight, grad_bias, grad_scale};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("ia3_linear", &fastpeft::ia3_linear_cuda);
  m.impl("ia3_linear_backward", &fastpeft::ia3_linear_backward_cuda);
}
