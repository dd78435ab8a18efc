// C++ declarations of fastpeft's kernels. The schemas live in torch_bindings.cpp;
// x is always 2-D [M, K] here (the Python wrappers flatten leading dims).
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastpeft {

using Tensor = at::Tensor;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// y = x W^T + b + scaling * (dropout(x) A^T) B^T; also returns t = dropout(x) A^T [M, r].
std::tuple<Tensor, Tensor> lora_linear_cpu(const Tensor& x, const Tensor& weight,
                                           const std::optional<Tensor>& bias,
                                           const Tensor& lora_a, const Tensor& lora_b,
                                           double scaling, double dropout_p,
                                           const Tensor& seed);
// (grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b); an output whose
// output_mask entry is false is an empty tensor.
Grads5 lora_linear_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                const Tensor& lora_a, const Tensor& lora_b,
                                const Tensor& lora_t, double scaling, double dropout_p,
                                const Tensor& seed, std::array<bool, 5> output_mask);

// Per-row adapter choice: lora_a [n, r, K], lora_b [n, N, r], scalings [n] fp32,
// adapter_ids [M] int64 in [-1, n). Returns y and t = x A_id^T [M, r] (zero where id = -1).
std::tuple<Tensor, Tensor> lora_linear_multi_cpu(const Tensor& x, const Tensor& weight,
                                                 const std::optional<Tensor>& bias,
                                                 const Tensor& lora_a, const Tensor& lora_b,
                                                 const Tensor& scalings,
                                                 const Tensor& adapter_ids);
Grads5 lora_linear_multi_backward_cpu(const Tensor& grad_out, const Tensor& x,
                                      const Tensor& weight, const Tensor& lora_a,
                                      const Tensor& lora_b, const Tensor& scalings,
                                      const Tensor& adapter_ids, const Tensor& lora_t,
                                      std::array<bool, 5> output_mask);

#ifdef FASTPEFT_WITH_CUDA
std::tuple<Tensor, Tensor> lora_linear_cuda(const Tensor& x, const Tensor& weight,
                                            const std::optional<Tensor>& bias,
                                            const Tensor& lora_a, const Tensor& lora_b,
                                            double scaling, double dropout_p,
                                            const Tensor& seed);
Grads5 lora_linear_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                 const Tensor& lora_a, const Tensor& lora_b,
                                 const Tensor& lora_t, double scaling, double dropout_p,
                                 const Tensor& seed, std::array<bool, 5> output_mask);
std::tuple<Tensor, Tensor> lora_linear_multi_cuda(const Tensor& x, const Tensor& weight,
                                                  const std::optional<Tensor>& bias,
                                                  const Tensor& lora_a, const Tensor& lora_b,
                                                  const Tensor& scalings,
                                                  const Tensor& adapter_ids);
Grads5 lora_linear_multi_backward_cuda(const Tensor& grad_out, const Tensor& x,
                                       const Tensor& weight, const Tensor& lora_a,
                                       const Tensor& lora_b, const Tensor& scalings,
                                       const Tensor& adapter_ids, const Tensor& lora_t,
                                       std::array<bool, 5> output_mask);
#endif

}  // namespace fastpeft
