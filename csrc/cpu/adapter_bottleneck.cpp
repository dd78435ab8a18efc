// CPU adapter_bottleneck forward and backward (semantics: csrc/torch_bindings.cpp, ops.h).
//
// The six products go to ATen GEMMs (MKL / oneDNN, all threads); what is fused is the
// traffic around them, the op being memory bound at small bottlenecks:
//  forward:  z = addmm(bd, h, Wd^T); A = [act(z), 1] in one pass over [M, R];
//            out = addmm(residual, A, [Wu, bu]^T, beta = 1, alpha = scaling): the up GEMM is
//            written on top of the residual and the bias rides in it as an extra column.
//  backward: grad_w_up and grad_b_up from one GEMM g^T (scaling [a, 1]);
//            gz = (g (scaling Wu)) * act'(z), with grad_b_down's column sums, in one pass over
//            [M, R]; grad_h = addmm(g, gz, Wd) when the residual is h (else gz Wd);
//            grad_w_down = gz^T h.
// Only h and z are kept for the backward (a = act(z) is recomputed). The elementwise passes
// compute in the accumulation type (fp32 for bf16, fp64 for fp64).
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/adapter_bottleneck_checks.h"
#include "cpu/row_reduce.h"
#include "ops.h"

namespace fastpeft {
namespace {

using cpu::parallel_column_sums;
using cpu::pass_grain;
using cpu::vector_to_tensor;

// Calls fn(std::integral_constant<Activation, act>) so that the activation is a compile-time
// constant inside fn's loops.
template <typename Fn>
void with_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kRelu:
      return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu:
      return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu:
      return fn(std::integral_constant<Activation, Activation::kSilu>{});
  }
}

// A [M, R + ones] = mul * [act(z), 1]: act(z) in the first R columns, mul in the last one
// when `ones` (the column that carries b_up through the GEMMs).
template <typename scalar_t>
Tensor activation_with_ones(const Tensor& z, Activation act, bool ones, double mul) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t M = z.size(0), R = z.size(1), R1 = R + (ones ? 1 : 0);
  Tensor a = at::empty({M, R1}, z.options());
  const scalar_t* Z = z.data_ptr<scalar_t>();
  scalar_t* A = a.data_ptr<scalar_t>();
  const op_t s = static_cast<op_t>(mul);
  with_activation(act, [&](auto kAct) {
    at::parallel_for(0, M, pass_grain(R), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* zr = Z + m * R;
        scalar_t* ar = A + m * R1;
        for (int64_t j = 0; j < R; ++j)
          ar[j] = static_cast<scalar_t>(
              s * activation_forward<op_t>(kAct.value, static_cast<op_t>(zr[j])));
        if (ones) ar[R] = static_cast<scalar_t>(s);
      }
    });
  });
  return a;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const Tensor& h, const Tensor& w_down,
                                        const std::optional<Tensor>& b_down, const Tensor& w_up,
                                        const std::optional<Tensor>& b_up, Activation act,
                                        double scaling, const Tensor& residual) {
  const int64_t D = h.size(1);
  // z = h Wd^T + bd [M, R], kept for the backward.
  const Tensor z = b_down.has_value() ? at::addmm(*b_down, h, w_down.t()) : at::mm(h, w_down.t());
  // out = residual + scaling * [act(z), 1] [Wu, bu]^T: one GEMM with beta = 1 on the residual.
  const bool has_bu = b_up.has_value();
  const Tensor a = activation_with_ones<scalar_t>(z, act, has_bu, 1.0);
  const Tensor wu = has_bu ? at::cat({w_up, b_up->view({D, 1})}, 1) : w_up;
  Tensor out = at::addmm(residual, a, wu.t(), /*beta=*/1, /*alpha=*/scaling);
  return {out, z};
}

template <typename scalar_t>
Grads5 backward_impl(const Tensor& g, const Tensor& h, const Tensor& w_down, const Tensor& w_up,
                     const Tensor& z, Activation act, double scaling, bool residual_is_h,
                     std::array<bool, 5> mask) {
  using op_t = at::opmath_type<scalar_t>;
  const bool need_gh = mask[0], need_gwd = mask[1], need_gbd = mask[2];
  const bool need_gwu = mask[3], need_gbu = mask[4];
  const int64_t M = g.size(0), R = w_down.size(0);
  const auto opts = g.options();
  // A masked-off output is its own empty tensor (outputs of an op must not alias).
  Tensor grad_h = g.new_empty({0}), grad_wd = g.new_empty({0}), grad_bd = g.new_empty({0});
  Tensor grad_wu = g.new_empty({0}), grad_bu = g.new_empty({0});

  if (need_gwu) {
    // [grad_w_up | grad_b_up] = g^T (scaling [a, 1]) [D, R (+ 1)]: one GEMM for both.
    const Tensor p = at::mm(g.t(), activation_with_ones<scalar_t>(z, act, need_gbu, scaling));
    if (need_gbu) {
      grad_wu = p.narrow(1, 0, R).contiguous();
      grad_bu = p.select(1, R).contiguous();
    } else {
      grad_wu = p;
    }
  } else if (need_gbu) {
    const int64_t D = g.size(1);
    const scalar_t* G = g.data_ptr<scalar_t>();
    std::vector<op_t> sums =
        parallel_column_sums<op_t>(M, D, pass_grain(D), [&](int64_t m0, int64_t m1, op_t* acc) {
          for (int64_t m = m0; m < m1; ++m)
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<op_t>(G[m * D + d]);
        });
    for (op_t& v : sums) v *= static_cast<op_t>(scaling);
    grad_bu = vector_to_tensor(sums, opts);
  }

  if (need_gh || need_gwd || need_gbd) {
    // gz = (g (scaling Wu)) * act'(z), written over the GEMM's output; grad_b_down's column
    // sums from the same pass.
    Tensor gz = at::mm(g, w_up * scaling);
    scalar_t* GZ = gz.data_ptr<scalar_t>();
    const scalar_t* Z = z.data_ptr<scalar_t>();
    std::vector<op_t> bd_sum;
    with_activation(act, [&](auto kAct) {
      bd_sum = parallel_column_sums<op_t>(
          M, need_gbd ? R : 0, pass_grain(R), [&](int64_t m0, int64_t m1, op_t* acc) {
            for (int64_t m = m0; m < m1; ++m) {
              scalar_t* gr = GZ + m * R;
              const scalar_t* zr = Z + m * R;
              for (int64_t j = 0; j < R; ++j) {
                const op_t v = static_cast<op_t>(gr[j]) *
                               activation_backward<op_t>(kAct.value, static_cast<op_t>(zr[j]));
                gr[j] = static_cast<scalar_t>(v);
                if (need_gbd) acc[j] += v;
              }
            }
          });
    });
    if (need_gbd) grad_bd = vector_to_tensor(bd_sum, opts);
    if (need_gh) grad_h = residual_is_h ? at::addmm(g, gz, w_down) : at::mm(gz, w_down);
    if (need_gwd) grad_wd = at::mm(gz.t(), h);
  }
  return {grad_h, grad_wd, grad_bd, grad_wu, grad_bu};
}

}  // namespace

std::tuple<Tensor, Tensor> adapter_bottleneck_cpu(const Tensor& h_in, const Tensor& w_down_in,
                                                  const std::optional<Tensor>& b_down_in,
                                                  const Tensor& w_up_in,
                                                  const std::optional<Tensor>& b_up_in,
                                                  c10::string_view activation, double scaling,
                                                  const std::optional<Tensor>& residual_in) {
  check_adapter_bottleneck_args(h_in, w_down_in, b_down_in, w_up_in, b_up_in, residual_in);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  TORCH_CHECK(h_in.device().is_cpu(), "fastpeft: adapter_bottleneck_cpu needs CPU tensors, got h on ",
              h_in.device());
  const Tensor h = h_in.contiguous();
  const Tensor w_down = w_down_in.contiguous();
  const Tensor w_up = w_up_in.contiguous();
  std::optional<Tensor> b_down, b_up;
  if (b_down_in.has_value()) b_down = b_down_in->contiguous();
  if (b_up_in.has_value()) b_up = b_up_in->contiguous();
  const Tensor residual = residual_in.has_value() ? residual_in->contiguous() : h;
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "adapter_bottleneck_cpu", [&] {
    out = forward_impl<scalar_t>(h, w_down, b_down, w_up, b_up, act, scaling, residual);
  });
  return out;
}

Grads5 adapter_bottleneck_backward_cpu(const Tensor& grad_out_in, const Tensor& h_in,
                                       const Tensor& w_down_in, const Tensor& w_up_in,
                                       const Tensor& z_in, c10::string_view activation,
                                       double scaling, bool residual_is_h,
                                       std::array<bool, 5> output_mask) {
  check_adapter_bottleneck_backward_args(grad_out_in, h_in, w_down_in, w_up_in, z_in);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  TORCH_CHECK(h_in.device().is_cpu(),
              "fastpeft: adapter_bottleneck_backward_cpu needs CPU tensors, got h on ",
              h_in.device());
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor h = h_in.contiguous();
  const Tensor w_down = w_down_in.contiguous();
  const Tensor w_up = w_up_in.contiguous();
  const Tensor z = z_in.contiguous();
  Grads5 grads;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(),
                                 "adapter_bottleneck_backward_cpu", [&] {
    grads = backward_impl<scalar_t>(grad_out, h, w_down, w_up, z, act, scaling, residual_is_h,
                                    output_mask);
  });
  return grads;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("adapter_bottleneck", &fastpeft::adapter_bottleneck_cpu);
  m.impl("adapter_bottleneck_backward", &fastpeft::adapter_bottleneck_backward_cpu);
}
