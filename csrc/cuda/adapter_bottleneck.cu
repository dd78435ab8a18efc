// CUDA implementation of fastpeft::adapter_bottleneck and its backward (semantics:
// csrc/torch_bindings.cpp): out = residual + scaling * (act(h Wd^T + bd) Wu^T + bu).
//
// Forward:
//   z = addmm(bd, h, Wd^T)                                  cuBLAS, [M, R], kept for the backward
//   a = act(z)                                              colwise pass, transient [M, R]
//   out = residual + scaling * bu                           colwise pass (the copy the GEMM
//   out.addmm_(a, Wu^T, beta = 1, alpha = scaling)          accumulates onto, in place)
// Backward, g = grad_out, gu = scaling * g (never materialized: alpha of the GEMMs):
//   gz = scaling * g Wu                                     cuBLAS, [M, R]
//   one colwise pass: a = act(z) (when grad_w_up is asked), gz *= act'(z) in place, and the
//   column sums of gz for grad_b_down (per-chunk partials, then at::sum: deterministic)
//   grad_w_up = scaling * g^T a, grad_b_up = scaling * sum_rows(g) (fp32 accumulation)
//   grad_w_down = gz^T h; grad_h = addmm(g, gz, Wd) when residual_is_h, else gz Wd.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/adapter_bottleneck_checks.h"
#include "cuda/colwise.cuh"
#include "ops.h"

namespace fastpeft {

namespace {

// a[i] = act(z[i]).
template <typename scalar_t>
struct ActForward {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;
  scalar_t* a;
  Activation act;
  __device__ __forceinline__ acc_t operator()(int64_t, int64_t, int64_t i) const {
    a[i] = static_cast<scalar_t>(activation_forward<acc_t>(act, static_cast<acc_t>(z[i])));
    return acc_t(0);
  }
};

// a[i] = act(z[i]) when a != nullptr; gz[i] *= act'(z[i]) in place; returns gz[i] (unrounded)
// for the column sums.
template <typename scalar_t>
struct ActBackward {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;
  scalar_t* gz;
  scalar_t* a;
  Activation act;
  __device__ __forceinline__ acc_t operator()(int64_t, int64_t, int64_t i) const {
    const acc_t zv = static_cast<acc_t>(z[i]);
    if (a != nullptr) a[i] = static_cast<scalar_t>(activation_forward<acc_t>(act, zv));
    const acc_t v = static_cast<acc_t>(gz[i]) * activation_backward<acc_t>(act, zv);
    gz[i] = static_cast<scalar_t>(v);
    return v;
  }
};

// out[m, d] = res[m, d] + s * bu[d] (bu may be nullptr).
template <typename scalar_t>
struct ResidualPlusBias {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* res;
  const scalar_t* bu;
  acc_t s;
  scalar_t* out;
  __device__ __forceinline__ acc_t operator()(int64_t, int64_t d, int64_t i) const {
    acc_t v = static_cast<acc_t>(res[i]);
    if (bu != nullptr) v += s * static_cast<acc_t>(bu[d]);
    out[i] = static_cast<scalar_t>(v);
    return acc_t(0);
  }
};

// alpha * mat1 @ mat2 in one cuBLAS call (alpha applied in the GEMM epilogue).
at::Tensor scaled_mm(const at::Tensor& mat1, const at::Tensor& mat2, double alpha) {
  if (mat1.size(0) == 0 || mat2.size(1) == 0 || mat1.size(1) == 0)
    return at::zeros({mat1.size(0), mat2.size(1)}, mat1.options());
  at::Tensor out = at::empty({mat1.size(0), mat2.size(1)}, mat1.options());
  out.addmm_(mat1, mat2, /*beta=*/0, /*alpha=*/alpha);  // beta = 0: out is never read
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> adapter_bottleneck_cuda(
    const Tensor& h_in, const Tensor& w_down_in, const std::optional<Tensor>& b_down,
    const Tensor& w_up_in, const std::optional<Tensor>& b_up, c10::string_view activation,
    double scaling, const std::optional<Tensor>& residual_in) {
  check_cuda_input(h_in, "adapter_bottleneck");
  check_adapter_bottleneck_args(h_in, w_down_in, b_down, w_up_in, b_up, residual_in);
  const Activation act = parse_activation(activation);
  c10::cuda::CUDAGuard device_guard(h_in.device());

  const Tensor h = h_in.contiguous();
  const Tensor w_down = w_down_in.contiguous();
  const Tensor w_up = w_up_in.contiguous();
  const Tensor residual = residual_in.has_value() ? residual_in->contiguous() : h;
  const Tensor bu = b_up.has_value() ? b_up->contiguous() : Tensor();
  const int64_t M = h.size(0), D = h.size(1), R = w_down.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();

  Tensor z = b_down.has_value() ? at::addmm(b_down->contiguous(), h, w_down.t())
                                : at::mm(h, w_down.t());  // [M, R]
  Tensor out = at::empty({M, D}, h.options());
  Tensor a = at::empty({M, R}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(),
                                  "fastpeft_adapter_bottleneck", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    colwise::launch<acc_t>(
        ActForward<scalar_t>{z.const_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(), act},
        M, R, /*reduce=*/false, h.options(), stream);
    colwise::launch<acc_t>(
        ResidualPlusBias<scalar_t>{residual.const_data_ptr<scalar_t>(),
                                   bu.defined() ? bu.const_data_ptr<scalar_t>() : nullptr,
                                   static_cast<acc_t>(scaling), out.mutable_data_ptr<scalar_t>()},
        M, D, /*reduce=*/false, h.options(), stream);
  });
  // out += scaling * a Wu^T, accumulated by cuBLAS onto the residual (no [M, D] temporary).
  if (M > 0 && D > 0 && R > 0) out.addmm_(a, w_up.t(), /*beta=*/1, /*alpha=*/scaling);
  return {out, z};
}

Grads5 adapter_bottleneck_backward_cuda(const Tensor& grad_out_in, const Tensor& h_in,
                                        const Tensor& w_down_in, const Tensor& w_up_in,
                                        const Tensor& z_in, c10::string_view activation,
                                        double scaling, bool residual_is_h,
                                        std::array<bool, 5> output_mask) {
  check_cuda_input(h_in, "adapter_bottleneck");
  check_adapter_bottleneck_backward_args(grad_out_in, h_in, w_down_in, w_up_in, z_in);
  const Activation act = parse_activation(activation);
  c10::cuda::CUDAGuard device_guard(h_in.device());

  const Tensor g = grad_out_in.contiguous();
  const Tensor h = h_in.contiguous();
  const Tensor w_down = w_down_in.contiguous();
  const Tensor w_up = w_up_in.contiguous();
  const Tensor z = z_in.contiguous();
  const int64_t M = h.size(0), R = w_down.size(0);
  const bool need_h = output_mask[0], need_wd = output_mask[1], need_bd = output_mask[2],
             need_wu = output_mask[3], need_bu = output_mask[4];
  const auto acc_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Outputs not asked for are 1-D empty tensors, each its own (outputs must not alias).
  auto none = [&] { return h.new_empty({0}); };
  Tensor grad_h = none(), grad_w_down = none(), grad_b_down = none(), grad_w_up = none(),
         grad_b_up = none();

  const bool need_gz = need_h || need_wd || need_bd;
  Tensor a;   // act(z) [M, R], only for grad_w_up
  if (need_wu) a = at::empty({M, R}, h.options());
  Tensor gz;  // scaling * (g Wu) * act'(z) [M, R]
  if (need_gz) gz = scaled_mm(g, w_up, scaling);
  if (need_gz || need_wu) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(),
                                    "fastpeft_adapter_bottleneck_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (need_gz) {
        at::Tensor part = colwise::launch<acc_t>(
            ActBackward<scalar_t>{z.const_data_ptr<scalar_t>(), gz.mutable_data_ptr<scalar_t>(),
                                  need_wu ? a.mutable_data_ptr<scalar_t>() : nullptr, act},
            M, R, /*reduce=*/need_bd, h.options(), stream);
        if (need_bd) grad_b_down = part.sum(0).to(h.scalar_type());
      } else {
        colwise::launch<acc_t>(
            ActForward<scalar_t>{z.const_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(),
                                 act},
            M, R, /*reduce=*/false, h.options(), stream);
      }
    });
  }

  if (need_wu) grad_w_up = scaled_mm(g.t(), a, scaling);  // [D, R]
  if (need_bu) {
    grad_b_up = at::sum(g, {0}, /*keepdim=*/false, acc_dtype).mul_(scaling).to(h.scalar_type());
  }
  if (need_wd) grad_w_down = at::mm(gz.t(), h);  // [R, D]
  if (need_h) {
    // grad of h through the down projection, plus grad_out itself when h is the residual.
    grad_h = residual_is_h ? at::addmm(g, gz, w_down) : at::mm(gz, w_down);  // [M, D]
  }
  return {grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("adapter_bottleneck", &fastpeft::adapter_bottleneck_cuda);
  m.impl("adapter_bottleneck_backward", &fastpeft::adapter_bottleneck_backward_cuda);
}
