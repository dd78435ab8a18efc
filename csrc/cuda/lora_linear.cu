// CUDA implementation of fastpeft::lora_linear and its backward (contract:
// docs/lora_linear_contract.md).
//
// Forward:
//   y = addmm(b, x, W^T)                               cuBLAS
//   t = dropout(x) A^T                                 p == 0: cuBLAS mm; p > 0: fused shrink
//                                                      kernel regenerating the Philox mask while
//                                                      it loads x (nothing [M, K] is written)
//   y.addmm_(t, B^T, beta = 1, alpha = scaling)        cuBLAS, in place: no [M, N] temporary
// Backward:
//   g = grad_out B                                     cuBLAS, [M, r]
//   grad_x = grad_out W, then in place                 cuBLAS; p == 0: addmm_(g, A, 1, s);
//            + s * (g A) * keep / (1 - p)              p > 0: fused expand kernel (mask
//                                                      regenerated, no [M, K] temporary)
//   grad_lora_a = s * g^T dropout(x)                   p > 0: dropout(x) is regenerated into a
//                                                      TRANSIENT [M, K] buffer fed to cuBLAS and
//                                                      freed right after (never saved)
//   grad_lora_b = s * grad_out^T t, grad_weight = grad_out^T x, grad_bias = sum_0 grad_out
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/lora_checks.h"
#include "common/philox.h"
#include "cuda/lora_kernels.cuh"
#include "ops.h"

namespace fastpeft {

namespace {

// alpha * mat1 @ mat2 in one cuBLAS call (alpha applied in the GEMM's fp32 epilogue).
at::Tensor scaled_mm(const at::Tensor& mat1, const at::Tensor& mat2, double alpha) {
  if (mat1.size(0) == 0 || mat2.size(1) == 0 || mat1.size(1) == 0)
    return at::zeros({mat1.size(0), mat2.size(1)}, mat1.options());
  // beta = 0: cuBLAS never reads `out`, so it needs no zero fill.
  at::Tensor out = at::empty({mat1.size(0), mat2.size(1)}, mat1.options());
  out.addmm_(mat1, mat2, /*beta=*/0, /*alpha=*/alpha);
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> lora_linear_cuda(const Tensor& x_in, const Tensor& weight_in,
                                            const std::optional<Tensor>& bias_in,
                                            const Tensor& lora_a_in, const Tensor& lora_b_in,
                                            double scaling, double dropout_p,
                                            const Tensor& seed) {
  check_lora_linear_args(x_in, weight_in, bias_in, lora_a_in, lora_b_in, dropout_p);
  check_cuda_input(x_in, "lora_linear");
  c10::cuda::CUDAGuard device_guard(x_in.device());

  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor lora_b = lora_b_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  const bool dropout = dropout_p > 0.0;
  const uint64_t seed_v = dropout ? read_seed(seed) : 0;

  if (M == 0) return {at::empty({0, N}, x.options()), at::empty({0, r}, x.options())};

  Tensor y;
  if (bias_in.has_value()) {
    y = at::addmm(bias_in->contiguous(), x, weight.t());
  } else {
    y = at::mm(x, weight.t());
  }

  Tensor t;
  if (!dropout || r == 0) {
    t = at::mm(x, lora_a.t());
  } else {
    t = at::empty({M, r}, x.options());
    const uint32_t threshold = dropout_threshold(dropout_p);
    const double keep_scale = 1.0 / (1.0 - dropout_p);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "fastpeft_lora_linear_shrink", [&] {
      cuda_kernels::launch_shrink<scalar_t>(x.const_data_ptr<scalar_t>(),
                                            lora_a.const_data_ptr<scalar_t>(), nullptr,
                                            t.mutable_data_ptr<scalar_t>(), M, K, r,
                                            /*n_adapters=*/1, /*dropout=*/true, seed_v,
                                            threshold, keep_scale, stream);
    });
  }

  if (r > 0 && N > 0) y.addmm_(t, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, t};
}

Grads5 lora_linear_backward_cuda(const Tensor& grad_out_in, const Tensor& x_in,
                                 const Tensor& weight_in, const Tensor& lora_a_in,
                                 const Tensor& lora_b_in, const Tensor& lora_t_in,
                                 double scaling, double dropout_p, const Tensor& seed,
                                 std::array<bool, 5> output_mask) {
  check_lora_linear_args(x_in, weight_in, std::nullopt, lora_a_in, lora_b_in, dropout_p);
  check_cuda_input(x_in, "lora_linear");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0),
                r = lora_a_in.size(0);
  check_backward_args(x_in, grad_out_in, lora_t_in, N, r);
  c10::cuda::CUDAGuard device_guard(x_in.device());

  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor lora_b = lora_b_in.contiguous();
  const Tensor lora_t = lora_t_in.contiguous();
  const bool dropout = dropout_p > 0.0;
  const uint64_t seed_v = dropout ? read_seed(seed) : 0;
  const uint32_t threshold = dropout ? dropout_threshold(dropout_p) : 0;
  const double keep_scale = 1.0 / (1.0 - dropout_p);
  auto stream = at::cuda::getCurrentCUDAStream();

  Tensor grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b;

  if (M == 0) {
    grad_x = output_mask[0] ? at::empty({0, K}, x.options()) : x.new_empty({0});
    grad_weight = output_mask[1] ? at::zeros({N, K}, x.options()) : x.new_empty({0});
    grad_bias = output_mask[2] ? at::zeros({N}, x.options()) : x.new_empty({0});
    grad_lora_a = output_mask[3] ? at::zeros({r, K}, x.options()) : x.new_empty({0});
    grad_lora_b = output_mask[4] ? at::zeros({N, r}, x.options()) : x.new_empty({0});
    return {grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b};
  }

  Tensor g;  // grad_out B [M, r]
  if (output_mask[0] || output_mask[3]) g = at::mm(grad_out, lora_b);

  if (output_mask[0]) {
    grad_x = at::mm(grad_out, weight);  // [M, K]; zeros when N == 0
    if (r > 0) {
      if (!dropout) {
        grad_x.addmm_(g, lora_a, /*beta=*/1, /*alpha=*/scaling);
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                        "fastpeft_lora_linear_backward_expand", [&] {
          cuda_kernels::launch_expand<scalar_t>(
              g.const_data_ptr<scalar_t>(), lora_a.const_data_ptr<scalar_t>(), nullptr,
              nullptr, scaling, grad_x.mutable_data_ptr<scalar_t>(), M, K, r,
              /*n_adapters=*/1, /*dropout=*/true, seed_v, threshold, keep_scale, stream);
        });
      }
    }
  } else {
    grad_x = x.new_empty({0});
  }

  grad_weight = output_mask[1] ? at::mm(grad_out.t(), x) : x.new_empty({0});
  grad_bias = output_mask[2] ? grad_out.sum(0) : x.new_empty({0});

  if (output_mask[3]) {
    if (!dropout) {
      grad_lora_a = scaled_mm(g.t(), x, scaling);
    } else {
      // Transient dropout(x): regenerated from the seed, consumed by cuBLAS, freed on return
      // of this block (it is never saved for anything).
      Tensor x_dropped = at::empty_like(x);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                      "fastpeft_lora_linear_backward_dropout", [&] {
        cuda_kernels::launch_dropout_apply<scalar_t>(
            x.const_data_ptr<scalar_t>(), x_dropped.mutable_data_ptr<scalar_t>(), x.numel(),
            seed_v, threshold, keep_scale, stream);
      });
      grad_lora_a = scaled_mm(g.t(), x_dropped, scaling);
    }
  } else {
    grad_lora_a = x.new_empty({0});
  }

  grad_lora_b = output_mask[4] ? scaled_mm(grad_out.t(), lora_t, scaling) : x.new_empty({0});

  return {grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("lora_linear", &fastpeft::lora_linear_cuda);
  m.impl("lora_linear_backward", &fastpeft::lora_linear_backward_cuda);
}
