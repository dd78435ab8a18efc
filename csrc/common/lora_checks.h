// Input checks shared by the CPU and CUDA LoRA kernels (host code). Every
// message names the argument, what was expected and what was given.
#pragma once

#include <optional>

#include "common/checks.h"

namespace fastpeft {

// x [M, K], weight [N, K], bias [N], lora_a [r, K], lora_b [N, r].
inline void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                   double dropout_p) {
  check_dim(x, 2, "x", "[M, in_features]");
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  check_dim(lora_a, 2, "lora_a", "[r, in_features]");
  check_dim(lora_b, 2, "lora_b", "[out_features, r]");
  check_same_device_dtype(x, weight, "weight");
  check_same_device_dtype(x, lora_a, "lora_a");
  check_same_device_dtype(x, lora_b, "lora_b");
  const int64_t K = x.size(1), N = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == K, "fastpeft: weight must be [out_features, ", K,
              "] to match x's last dim ", K, ", got ", weight.sizes());
  TORCH_CHECK(lora_a.size(1) == K, "fastpeft: lora_a must be [r, ", K,
              "] to match x's last dim ", K, ", got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == N && lora_b.size(1) == r, "fastpeft: lora_b must be [", N, ", ",
              r, "] (out_features, r), got ", lora_b.sizes());
  if (bias.has_value()) {
    check_same_device_dtype(x, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "fastpeft: bias must be [", N,
                "] (out_features), got ", bias->sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastpeft: dropout_p must be in [0, 1), got ",
              dropout_p);
}

// x [M, K], weight [N, K], lora_a [n, r, K], lora_b [n, N, r], scalings [n] fp32,
// adapter_ids [M] int64.
inline void check_lora_linear_multi_args(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                         const at::Tensor& scalings,
                                         const at::Tensor& adapter_ids) {
  check_dim(x, 2, "x", "[M, in_features]");
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  check_dim(lora_a, 3, "lora_a", "[n_adapters, r, in_features]");
  check_dim(lora_b, 3, "lora_b", "[n_adapters, out_features, r]");
  check_same_device_dtype(x, weight, "weight");
  check_same_device_dtype(x, lora_a, "lora_a");
  check_same_device_dtype(x, lora_b, "lora_b");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t n = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK(weight.size(1) == K, "fastpeft: weight must be [out_features, ", K,
              "] to match x's last dim ", K, ", got ", weight.sizes());
  TORCH_CHECK(lora_a.size(2) == K, "fastpeft: lora_a must be [n_adapters, r, ", K, "], got ",
              lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == n && lora_b.size(1) == N && lora_b.size(2) == r,
              "fastpeft: lora_b must be [", n, ", ", N, ", ", r, "], got ", lora_b.sizes());
  if (bias.has_value()) {
    check_same_device_dtype(x, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "fastpeft: bias must be [", N,
                "] (out_features), got ", bias->sizes());
  }
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == n &&
                  scalings.scalar_type() == at::kFloat && scalings.device() == x.device(),
              "fastpeft: scalings must be a float32 [", n, "] tensor on ", x.device(),
              ", got ", scalings.scalar_type(), " ", scalings.sizes(), " on ", scalings.device());
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == M &&
                  adapter_ids.scalar_type() == at::kLong && adapter_ids.device() == x.device(),
              "fastpeft: adapter_ids must be an int64 [", M, "] tensor on ", x.device(),
              ", got ", adapter_ids.scalar_type(), " ", adapter_ids.sizes(), " on ",
              adapter_ids.device());
}

// The extra tensors of a backward: grad_out [M, N] and the saved lora_t [M, r], like x.
inline void check_backward_args(const at::Tensor& x, const at::Tensor& grad_out,
                                const at::Tensor& lora_t, int64_t N, int64_t r) {
  const int64_t M = x.size(0);
  check_same_device_dtype(x, grad_out, "grad_out");
  check_same_device_dtype(x, lora_t, "lora_t");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == N,
              "fastpeft: grad_out must be [", M, ", ", N, "], got ", grad_out.sizes());
  TORCH_CHECK(lora_t.dim() == 2 && lora_t.size(0) == M && lora_t.size(1) == r,
              "fastpeft: lora_t must be [", M, ", ", r, "], got ", lora_t.sizes());
}

inline uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "fastpeft: seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(),
              " ", seed.sizes(), " on ", seed.device());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

}  // namespace fastpeft
