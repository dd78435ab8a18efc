// CUDA implementation of fastpeft::lora_linear_multi and its backward (contract:
// docs/lora_linear_contract.md): several stacked adapters, one adapter id per row
// (id -1 = base only), BGMV / SGMV style.
//
// Forward (no host synchronisation):
//   y = addmm(b, x, W^T)                                 (cuBLAS)
//   t[m] = x[m] A_{id[m]}^T                              shrink kernel (0 where id == -1)
//   y[m] += scalings[id[m]] * t[m] B_{id[m]}^T           expand kernel, in place
// Backward:
//   g[m] = grad_out[m] B_{id[m]}                         shrink kernel over N
//   grad_x = grad_out W (cuBLAS), then += s_m g[m] A_{id[m]}        expand kernel, in place
//   grad_lora_a[a] = s_a sum_{id[m] = a} g[m]^T x[m]     segmented outer-product kernel
//   grad_lora_b[a] = s_a sum_{id[m] = a} grad_out[m]^T t[m]         (fp32 partial sums per row
//                                                        chunk, summed deterministically)
//   grad_weight = grad_out^T x, grad_bias = sum_0 grad_out
// lora_b [n, N, r] is transposed once to [n, r, N] (n * N * r elements, small) so that every
// kernel reads the adapters with the output column contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/lora_checks.h"
#include "cuda/lora_kernels.cuh"
#include "ops.h"

namespace fastpeft {

namespace {

// [n, N, r] -> [n, r, N], contiguous.
at::Tensor transpose_b(const at::Tensor& lora_b) { return lora_b.transpose(1, 2).contiguous(); }

}  // namespace

std::tuple<Tensor, Tensor> lora_linear_multi_cuda(const Tensor& x_in, const Tensor& weight_in,
                                                  const std::optional<Tensor>& bias_in,
                                                  const Tensor& lora_a_in,
                                                  const Tensor& lora_b_in,
                                                  const Tensor& scalings_in,
                                                  const Tensor& adapter_ids_in) {
  check_lora_linear_multi_args(x_in, weight_in, bias_in, lora_a_in, lora_b_in, scalings_in,
                               adapter_ids_in);
  check_cuda_input(x_in, "lora_linear_multi");
  c10::cuda::CUDAGuard device_guard(x_in.device());

  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor scalings = scalings_in.contiguous();
  const Tensor ids = adapter_ids_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t n = lora_a.size(0), r = lora_a.size(1);

  if (M == 0) return {at::empty({0, N}, x.options()), at::empty({0, r}, x.options())};

  Tensor y;
  if (bias_in.has_value()) {
    y = at::addmm(bias_in->contiguous(), x, weight.t());
  } else {
    y = at::mm(x, weight.t());
  }
  // Every element of t is written by the shrink kernel (zeros for id -1); zeros() keeps r == 0
  // and n == 0 trivially right.
  Tensor t = (n > 0 && r > 0) ? at::empty({M, r}, x.options()) : at::zeros({M, r}, x.options());
  if (n == 0 || r == 0) return {y, t};

  const Tensor b_t = transpose_b(lora_b_in);  // [n, r, N]
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fastpeft_lora_linear_multi", [&] {
    cuda_kernels::launch_shrink<scalar_t>(x.const_data_ptr<scalar_t>(),
                                          lora_a.const_data_ptr<scalar_t>(),
                                          ids.const_data_ptr<int64_t>(),
                                          t.mutable_data_ptr<scalar_t>(), M, K, r, n,
                                          /*dropout=*/false, 0, 0, 1.0, stream);
    cuda_kernels::launch_expand<scalar_t>(t.const_data_ptr<scalar_t>(),
                                          b_t.const_data_ptr<scalar_t>(),
                                          ids.const_data_ptr<int64_t>(),
                                          scalings.const_data_ptr<float>(), 1.0,
                                          y.mutable_data_ptr<scalar_t>(), M, N, r, n,
                                          /*dropout=*/false, 0, 0, 1.0, stream);
  });
  return {y, t};
}

Grads5 lora_linear_multi_backward_cuda(const Tensor& grad_out_in, const Tensor& x_in,
                                       const Tensor& weight_in, const Tensor& lora_a_in,
                                       const Tensor& lora_b_in, const Tensor& scalings_in,
                                       const Tensor& adapter_ids_in, const Tensor& lora_t_in,
                                       std::array<bool, 5> output_mask) {
  check_lora_linear_multi_args(x_in, weight_in, std::nullopt, lora_a_in, lora_b_in,
                               scalings_in, adapter_ids_in);
  check_cuda_input(x_in, "lora_linear_multi");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0);
  const int64_t n = lora_a_in.size(0), r = lora_a_in.size(1);
  check_backward_args(x_in, grad_out_in, lora_t_in, N, r);
  c10::cuda::CUDAGuard device_guard(x_in.device());

  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor scalings = scalings_in.contiguous();
  const Tensor ids = adapter_ids_in.contiguous();
  const Tensor lora_t = lora_t_in.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();

  Tensor grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b;

  if (M == 0) {
    grad_x = output_mask[0] ? at::empty({0, K}, x.options()) : x.new_empty({0});
    grad_weight = output_mask[1] ? at::zeros({N, K}, x.options()) : x.new_empty({0});
    grad_bias = output_mask[2] ? at::zeros({N}, x.options()) : x.new_empty({0});
    grad_lora_a = output_mask[3] ? at::zeros({n, r, K}, x.options()) : x.new_empty({0});
    grad_lora_b = output_mask[4] ? at::zeros({n, N, r}, x.options()) : x.new_empty({0});
    return {grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b};
  }

  const bool has_lora = n > 0 && r > 0;
  const at::ScalarType acc_type =
      x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // opmath dtype
  const at::TensorOptions acc_opts = x.options().dtype(acc_type);

  // g[m] = grad_out[m] B_{id[m]} [M, r] (0 for id -1).
  Tensor g;
  if (has_lora && (output_mask[0] || output_mask[3])) {
    const Tensor b_t = transpose_b(lora_b_in);  // [n, r, N]
    g = at::empty({M, r}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "fastpeft_lora_linear_multi_backward_g", [&] {
      cuda_kernels::launch_shrink<scalar_t>(grad_out.const_data_ptr<scalar_t>(),
                                            b_t.const_data_ptr<scalar_t>(),
                                            ids.const_data_ptr<int64_t>(),
                                            g.mutable_data_ptr<scalar_t>(), M, N, r, n,
                                            /*dropout=*/false, 0, 0, 1.0, stream);
    });
  }

  if (output_mask[0]) {
    grad_x = at::mm(grad_out, weight);  // [M, K]
    if (has_lora) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                      "fastpeft_lora_linear_multi_backward_x", [&] {
        cuda_kernels::launch_expand<scalar_t>(g.const_data_ptr<scalar_t>(),
                                              lora_a.const_data_ptr<scalar_t>(),
                                              ids.const_data_ptr<int64_t>(),
                                              scalings.const_data_ptr<float>(), 1.0,
                                              grad_x.mutable_data_ptr<scalar_t>(), M, K, r, n,
                                              /*dropout=*/false, 0, 0, 1.0, stream);
      });
    }
  } else {
    grad_x = x.new_empty({0});
  }

  grad_weight = output_mask[1] ? at::mm(grad_out.t(), x) : x.new_empty({0});
  grad_bias = output_mask[2] ? grad_out.sum(0) : x.new_empty({0});

  // sum_{m: id[m] = a} scalings[a] * u[m]^T v[m] per adapter a: [n, r, C] in the
  // accumulation dtype (cast once by the caller). u is [M, r], v is [M, C].
  const Tensor scale3 = scalings.to(acc_type).view({n, 1, 1});
  auto adapter_outer = [&](const Tensor& u, const Tensor& v) {
    Tensor part;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "fastpeft_lora_linear_multi_backward_outer", [&] {
      part = cuda_kernels::launch_outer<scalar_t>(u.const_data_ptr<scalar_t>(),
                                                  v.const_data_ptr<scalar_t>(),
                                                  ids.const_data_ptr<int64_t>(), M, v.size(1), r,
                                                  n, acc_opts, stream);
    });
    return part.sum(0).mul_(scale3);
  };

  if (!output_mask[3]) {
    grad_lora_a = x.new_empty({0});
  } else if (!has_lora) {
    grad_lora_a = at::zeros({n, r, K}, x.options());
  } else {
    grad_lora_a = adapter_outer(g, x).to(x.scalar_type()).contiguous();  // [n, r, K]
  }

  if (!output_mask[4]) {
    grad_lora_b = x.new_empty({0});
  } else if (!has_lora) {
    grad_lora_b = at::zeros({n, N, r}, x.options());
  } else {
    // [n, r, N] -> the contract's [n, N, r].
    grad_lora_b = adapter_outer(lora_t, grad_out).transpose(1, 2).to(x.scalar_type()).contiguous();
  }

  return {grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("lora_linear_multi", &fastpeft::lora_linear_multi_cuda);
  m.impl("lora_linear_multi_backward", &fastpeft::lora_linear_multi_backward_cuda);
}
