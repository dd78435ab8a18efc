// Input checks of token_logprobs, shared by the CPU and CUDA kernels (host code).
#pragma once

#include <optional>

#include "common/checks.h"

namespace fastpeft {

// logits [N, V] (V >= 1), tokens [N] int64 on logits' device, temperature > 0.
inline void check_token_logprobs_args(const at::Tensor& logits, const at::Tensor& tokens,
                                      double temperature) {
  check_dim(logits, 2, "logits", "[N, vocab]");
  TORCH_CHECK(logits.size(1) >= 1, "fastpeft: logits must have a vocab dim of at least 1, got ",
              logits.sizes());
  check_dim(tokens, 1, "tokens", "[N]");
  TORCH_CHECK(tokens.device() == logits.device(), "fastpeft: tokens must be on ",
              logits.device(), " like logits, got ", tokens.device());
  TORCH_CHECK(tokens.scalar_type() == at::kLong, "fastpeft: tokens must have dtype int64, got ",
              tokens.scalar_type());
  TORCH_CHECK(tokens.size(0) == logits.size(0), "fastpeft: tokens must be [", logits.size(0),
              "] like logits' rows, got ", tokens.sizes());
  TORCH_CHECK(temperature > 0, "fastpeft: temperature must be > 0, got ", temperature);
}

// The backward's extra tensors: grad_logp [N] (and grad_entropy [N]) like logits, stats [N, 3].
inline void check_token_logprobs_backward_args(const at::Tensor& grad_logp,
                                               const std::optional<at::Tensor>& grad_entropy,
                                               const at::Tensor& logits,
                                               const at::Tensor& tokens, const at::Tensor& stats,
                                               double temperature) {
  check_token_logprobs_args(logits, tokens, temperature);
  const int64_t N = logits.size(0);
  check_same_device_dtype(logits, grad_logp, "grad_logp", "logits");
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == N, "fastpeft: grad_logp must be [",
              N, "], got ", grad_logp.sizes());
  if (grad_entropy.has_value()) {
    check_same_device_dtype(logits, *grad_entropy, "grad_entropy", "logits");
    TORCH_CHECK(grad_entropy->dim() == 1 && grad_entropy->size(0) == N,
                "fastpeft: grad_entropy must be [", N, "], got ", grad_entropy->sizes());
  }
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.device() == logits.device() && stats.scalar_type() == acc,
              "fastpeft: stats must be ", acc, " on ", logits.device(), ", got ",
              stats.scalar_type(), " on ", stats.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 3,
              "fastpeft: stats must be [", N, ", 3], got ", stats.sizes());
}

}  // namespace fastpeft
