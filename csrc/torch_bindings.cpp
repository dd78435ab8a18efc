// Every fastpeft op schema, and the CPU implementations. CUDA implementations
// register in csrc/cuda/*.cu; the Triton ones from python/fastpeft/ops/triton.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fastpeft, m) {
  // LoRA linear: (y, t) with y = x W^T + b + scaling * t B^T, t = dropout(x) A^T.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // Its backward: (grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b).
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor lora_t, float scaling, float dropout_p, Tensor seed, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // LoRA linear with a per-row adapter id into stacked adapters (-1 = base only).
  m.def(
      "lora_linear_multi(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor scalings, Tensor adapter_ids) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_multi_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor scalings, Tensor adapter_ids, Tensor lora_t, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The Triton implementations of lora_linear (kernels in python/fastpeft/ops/triton).
  m.def(
      "lora_linear_triton(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_triton_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor lora_t, float scaling, float dropout_p, Tensor seed, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear", &fastpeft::lora_linear_cpu);
  m.impl("lora_linear_backward", &fastpeft::lora_linear_backward_cpu);
  m.impl("lora_linear_multi", &fastpeft::lora_linear_multi_cpu);
  m.impl("lora_linear_multi_backward", &fastpeft::lora_linear_multi_backward_cpu);
}
