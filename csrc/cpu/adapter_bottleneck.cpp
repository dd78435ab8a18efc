// CPU adapter_bottleneck forward and backward (semantics: csrc/torch_bindings.cpp, ops.h).
//
// The six products are ATen GEMMs (MKL / oneDNN; they accumulate in fp32 for bf16), run per
// row chunk: one chunk per thread, each running its rows' whole chain single-threaded (MKL
// threads these skinny GEMMs poorly), the weight gradients as per-chunk partials summed at the
// end. What is fused is the traffic around the GEMMs:
//  forward:  z = h Wd^T + bd; out = residual + scaling * bu (one pass: the copy addmm would
//            make anyway), then out += scaling * act(z) Wu^T (GEMM with beta = 1).
//  backward: [grad_w_up | grad_b_up]^T from one GEMM scaling [a, 1]^T g (a recomputed from z);
//            gz = (scaling g Wu) * act'(z) in place over that GEMM's output;
//            grad_h = g + gz Wd (GEMM with beta = 1 on the copy of g) when the residual is h,
//            else gz Wd; grad_w_down = gz^T h.
// Only h and z are kept for the backward. The activations and their derivatives run as ATen's
// vectorised kernels over [M, R] (same formulas as common/activation.h; scalar erf / tanh
// per element cost more than a GEMM at these shapes).
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/adapter_bottleneck_checks.h"
#include "ops.h"

namespace fastpeft {
namespace {

// The CPU kernels' dtypes (fp64 for gradcheck).
void check_cpu_dtype(const Tensor& h) {
  const auto dt = h.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "fastpeft: adapter_bottleneck (CPU) supports float32, bfloat16 and float64 h, got ",
              dt);
}

// out = act(z), out contiguous (ATen's gelu.out silently writes wrong values into a strided
// out, seen with torch 2.14). ATen's vectorised kernels: the same formulas as
// common/activation.h and torch.nn.functional, and scalar erf / tanh per element would cost
// more than a GEMM at these shapes.
void activation_out(Tensor& out, const Tensor& z, Activation act) {
  switch (act) {
    case Activation::kRelu:
      at::threshold_out(out, z, 0, 0);
      break;
    case Activation::kGelu:
      at::gelu_out(out, z, "none");
      break;
    case Activation::kGeluTanh:
      at::gelu_out(out, z, "tanh");
      break;
    case Activation::kSilu:
      at::silu_out(out, z);
      break;
  }
}

// grad *= act'(z), in place (relu: 0 at z <= 0).
void activation_backward_(Tensor& grad, const Tensor& z, Activation act) {
  switch (act) {
    case Activation::kRelu:
      at::threshold_backward_out(grad, grad, z, 0);
      break;
    case Activation::kGelu:
      at::gelu_backward_out(grad, grad, z, "none");
      break;
    case Activation::kGeluTanh:
      at::gelu_backward_out(grad, grad, z, "tanh");
      break;
    case Activation::kSilu:
      at::silu_backward_out(grad, grad, z);
      break;
  }
}

// act(z) [M, R], followed by a column of ones when `ones` (it carries b_up through the GEMM).
Tensor activation_with_ones(const Tensor& z, Activation act, bool ones) {
  const int64_t M = z.size(0), R = z.size(1);
  Tensor a = at::empty({M, R}, z.options());
  activation_out(a, z, act);
  if (!ones) return a;
  Tensor a1 = at::empty({M, R + 1}, z.options());
  a1.narrow(1, 0, R).copy_(a);
  a1.select(1, R).fill_(1);
  return a1;
}

// The rows split into one chunk per thread, each running its rows' whole chain of GEMMs and
// passes single-threaded (MKL threads these skinny GEMMs poorly: 1.2x on 2 threads at
// D = 576, R = 36), so that only the weight gradients need per-chunk partials. One chunk
// (MKL threading the GEMMs itself) when M is small.
struct RowChunks {
  int64_t M = 0, n = 1;
  int64_t begin(int64_t c) const { return c * M / n; }
};

RowChunks row_chunks(int64_t M) {
  constexpr int64_t kMinRows = 64;
  const int64_t nthreads = std::max<int64_t>(at::get_num_threads(), 1);
  return {M, std::clamp<int64_t>(M / kMinRows, 1, nthreads)};
}

// f(chunk, first row, rows) for every chunk, in parallel.
template <typename F>
void for_row_chunks(const RowChunks& chunks, const F& f) {
  if (chunks.n == 1) return f(0, 0, chunks.M);
  at::parallel_for(0, chunks.n, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // thread-local: set again on the workers
    for (int64_t c = c0; c < c1; ++c) f(c, chunks.begin(c), chunks.begin(c + 1) - chunks.begin(c));
  });
}

std::tuple<Tensor, Tensor> forward_impl(const Tensor& h, const Tensor& w_down,
                                        const std::optional<Tensor>& b_down, const Tensor& w_up,
                                        const std::optional<Tensor>& b_up, Activation act,
                                        double scaling, const Tensor& residual) {
  const int64_t M = h.size(0), D = h.size(1), R = w_down.size(0);
  Tensor z = at::empty({M, R}, h.options());  // h Wd^T + bd, kept for the backward
  Tensor out = at::empty({M, D}, h.options());
  for_row_chunks(row_chunks(M), [&](int64_t, int64_t m0, int64_t rows) {
    const Tensor hc = h.narrow(0, m0, rows), rc = residual.narrow(0, m0, rows);
    Tensor zc = z.narrow(0, m0, rows), oc = out.narrow(0, m0, rows);
    if (b_down.has_value()) {
      at::addmm_out(zc, *b_down, hc, w_down.t());
    } else {
      at::mm_out(zc, hc, w_down.t());
    }
    // out = (residual + scaling * bu) + scaling * act(z) Wu^T: the bias added in the copy of
    // the residual (which addmm would make anyway), then a GEMM with beta = 1 on top of it.
    const Tensor a = activation_with_ones(zc, act, /*ones=*/false);
    if (b_up.has_value()) {
      at::add_out(oc, rc, *b_up, scaling);
    } else {
      oc.copy_(rc);
    }
    oc.addmm_(a, w_up.t(), /*beta=*/1, /*alpha=*/scaling);
  });
  return {out, z};
}

Grads5 backward_impl(const Tensor& g, const Tensor& h, const Tensor& w_down, const Tensor& w_up,
                     const Tensor& z, Activation act, double scaling, bool residual_is_h,
                     std::array<bool, 5> mask) {
  const bool need_gh = mask[0], need_gwd = mask[1], need_gbd = mask[2];
  const bool need_gwu = mask[3], need_gbu = mask[4];
  const bool need_gz = need_gh || need_gwd || need_gbd;
  const int64_t M = g.size(0), D = g.size(1), R = w_down.size(0);
  const auto opts = g.options();
  // A masked-off output is its own empty tensor (outputs of an op must not alias).
  Tensor grad_h = g.new_empty({0}), grad_wd = g.new_empty({0}), grad_bd = g.new_empty({0});
  Tensor grad_wu = g.new_empty({0}), grad_bu = g.new_empty({0});
  const RowChunks chunks = row_chunks(M);
  // Per-chunk partials of the weight gradients, summed at the end. With need_gwu,
  // [grad_w_up | grad_b_up]^T = scaling [a, 1]^T g [R (+ 1), D]: one GEMM for both, in the
  // orientation MKL runs fastest (a^T g beats g^T a by ~15-35% at these shapes).
  const int64_t R1 = R + (need_gbu ? 1 : 0);
  Tensor p_parts, wd_parts, bd_parts;
  if (need_gwu) p_parts = at::empty({chunks.n, R1, D}, opts);
  if (need_gwd) wd_parts = at::empty({chunks.n, R, D}, opts);
  if (need_gbd) bd_parts = at::empty({chunks.n, R}, opts);
  if (need_gh) grad_h = at::empty({M, D}, opts);
  if (need_gwu || need_gz) {
    for_row_chunks(chunks, [&](int64_t c, int64_t m0, int64_t rows) {
      const Tensor gc = g.narrow(0, m0, rows), zc = z.narrow(0, m0, rows);
      if (need_gwu) {
        Tensor pc = p_parts.select(0, c);
        at::addmm_out(pc, pc, activation_with_ones(zc, act, need_gbu).t(), gc, /*beta=*/0,
                      /*alpha=*/scaling);
      }
      if (!need_gz) return;
      // gz = (scaling g Wu) * act'(z), in place over the GEMM's output.
      Tensor gz = at::empty({rows, R}, opts);
      at::addmm_out(gz, gz, gc, w_up, /*beta=*/0, /*alpha=*/scaling);
      activation_backward_(gz, zc, act);
      if (need_gbd) {
        Tensor bc = bd_parts.select(0, c);
        at::sum_out(bc, gz, 0);
      }
      if (need_gh) {
        // grad_h = g + gz Wd (the residual's gradient when it is h), on top of the copy of g.
        Tensor hc = grad_h.narrow(0, m0, rows);
        if (residual_is_h) {
          at::addmm_out(hc, gc, gz, w_down);
        } else {
          at::mm_out(hc, gz, w_down);
        }
      }
      if (need_gwd) {
        Tensor wc = wd_parts.select(0, c);
        at::mm_out(wc, gz.t(), h.narrow(0, m0, rows));
      }
    });
  }
  // The chunks' partials summed (one chunk: the partial itself).
  auto total = [&](const Tensor& parts) {
    return chunks.n == 1 ? parts.select(0, 0) : parts.sum(0);
  };
  if (need_gwu) {
    const Tensor p = total(p_parts);
    grad_wu = p.narrow(0, 0, R).t().contiguous();
    if (need_gbu) grad_bu = p.select(0, R).clone();
  } else if (need_gbu) {
    grad_bu = g.sum(0).mul_(scaling);
  }
  if (need_gwd) grad_wd = total(wd_parts).contiguous();
  if (need_gbd) grad_bd = total(bd_parts).contiguous();
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
  // The ATen calls below are the kernel's own work: no autograd recording (the backward op is
  // called with grad mode on under create_graph, and out= calls refuse inputs needing grad).
  at::AutoDispatchBelowADInplaceOrView guard;
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
  check_cpu_dtype(h);
  return forward_impl(h, w_down, b_down, w_up, b_up, act, scaling, residual);
}

Grads5 adapter_bottleneck_backward_cpu(const Tensor& grad_out_in, const Tensor& h_in,
                                       const Tensor& w_down_in, const Tensor& w_up_in,
                                       const Tensor& z_in, c10::string_view activation,
                                       double scaling, bool residual_is_h,
                                       std::array<bool, 5> output_mask) {
  check_adapter_bottleneck_backward_args(grad_out_in, h_in, w_down_in, w_up_in, z_in);
  // The ATen calls below are the kernel's own work: no autograd recording (the backward op is
  // called with grad mode on under create_graph, and out= calls refuse inputs needing grad).
  at::AutoDispatchBelowADInplaceOrView guard;
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  TORCH_CHECK(h_in.device().is_cpu(),
              "fastpeft: adapter_bottleneck_backward_cpu needs CPU tensors, got h on ",
              h_in.device());
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor h = h_in.contiguous();
  const Tensor w_down = w_down_in.contiguous();
  const Tensor w_up = w_up_in.contiguous();
  const Tensor z = z_in.contiguous();
  check_cpu_dtype(h);
  return backward_impl(grad_out, h, w_down, w_up, z, act, scaling, residual_is_h, output_mask);
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("adapter_bottleneck", &fastpeft::adapter_bottleneck_cpu);
  m.impl("adapter_bottleneck_backward", &fastpeft::adapter_bottleneck_backward_cpu);
}
