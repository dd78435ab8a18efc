// C++ declarations of fastpeft's kernels. The schemas live in torch_bindings.cpp; each kernel
// file registers its own implementations. x / h are always 2-D [M, K] here (the Python wrappers
// flatten leading dims).
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace fastpeft {

using Tensor = at::Tensor;
using Grads4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
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

// IA3 (see torch_bindings.cpp): (y, unscaled) and (grad_x, grad_weight, grad_bias, grad_scale).
#define FASTPEFT_IA3_LINEAR_DECLS(suffix)                                                       \
  std::tuple<Tensor, Tensor> ia3_linear_##suffix(const Tensor& x, const Tensor& weight,         \
                                                 const std::optional<Tensor>& bias,            \
                                                 const Tensor& scale, bool scale_input,        \
                                                 bool keep_unscaled);                          \
  Grads4 ia3_linear_backward_##suffix(const Tensor& grad_out, const Tensor& x,                 \
                                      const Tensor& weight, const std::optional<Tensor>& bias, \
                                      const Tensor& scale, const Tensor& unscaled,             \
                                      bool scale_input, std::array<bool, 4> output_mask);

// Bottleneck adapter: (out, z) and (grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up).
#define FASTPEFT_ADAPTER_BOTTLENECK_DECLS(suffix)                                              \
  std::tuple<Tensor, Tensor> adapter_bottleneck_##suffix(                                      \
      const Tensor& h, const Tensor& w_down, const std::optional<Tensor>& b_down,              \
      const Tensor& w_up, const std::optional<Tensor>& b_up, c10::string_view activation,      \
      double scaling, const std::optional<Tensor>& residual);                                  \
  Grads5 adapter_bottleneck_backward_##suffix(                                                 \
      const Tensor& grad_out, const Tensor& h, const Tensor& w_down, const Tensor& w_up,       \
      const Tensor& z, c10::string_view activation, double scaling, bool residual_is_h,        \
      std::array<bool, 5> output_mask);

// Prefix attention: (out, lse) and (grad_q, grad_k, grad_v, grad_prefix_k, grad_prefix_v).
#define FASTPEFT_PREFIX_ATTENTION_DECLS(suffix)                                                \
  std::tuple<Tensor, Tensor> prefix_attention_##suffix(                                        \
      const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,               \
      const Tensor& prefix_v, const std::optional<Tensor>& attn_mask, bool causal,             \
      double scale);                                                                           \
  Grads5 prefix_attention_backward_##suffix(                                                   \
      const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,               \
      const Tensor& prefix_k, const Tensor& prefix_v, const std::optional<Tensor>& attn_mask,  \
      const Tensor& out, const Tensor& lse, bool causal, double scale);

FASTPEFT_IA3_LINEAR_DECLS(cpu)
FASTPEFT_ADAPTER_BOTTLENECK_DECLS(cpu)
FASTPEFT_PREFIX_ATTENTION_DECLS(cpu)

#ifdef FASTPEFT_WITH_CUDA
FASTPEFT_IA3_LINEAR_DECLS(cuda)
FASTPEFT_ADAPTER_BOTTLENECK_DECLS(cuda)
FASTPEFT_PREFIX_ATTENTION_DECLS(cuda)
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

// token_logprobs (see torch_bindings.cpp): (logp, entropy, stats) and grad_logits.
#define FASTPEFT_TOKEN_LOGPROBS_DECLS(suffix)                                                  \
  std::tuple<Tensor, Tensor, Tensor> token_logprobs_##suffix(                                  \
      const Tensor& logits, const Tensor& tokens, double temperature, bool return_entropy);    \
  Tensor token_logprobs_backward_##suffix(                                                     \
      const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits, \
      const Tensor& tokens, const Tensor& stats, double temperature);
FASTPEFT_TOKEN_LOGPROBS_DECLS(cpu)
#ifdef FASTPEFT_WITH_CUDA
FASTPEFT_TOKEN_LOGPROBS_DECLS(cuda)
#endif

}  // namespace fastpeft

// PPO: policy / value loss (loss, stats, d loss / d input), their backward (grad_loss * grad),
// gae (advantages, returns), masked_whiten (out, stats) and its backward. See torch_bindings.cpp.
namespace fastpeft {
#define FASTPEFT_PPO_DECLS(suffix)                                                              \
  std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_##suffix(                                 \
      const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,            \
      const Tensor& mask, const std::optional<Tensor>& ref_logprobs, double clip_low,          \
      double clip_high, double kl_coef, c10::string_view kl_estimator);                        \
  std::tuple<Tensor, Tensor, Tensor> ppo_value_loss_##suffix(                                  \
      const Tensor& values, const Tensor& old_values, const Tensor& returns,                   \
      const Tensor& mask, double clip);                                                        \
  Tensor ppo_loss_backward_##suffix(const Tensor& grad_loss, const Tensor& grad);              \
  std::tuple<Tensor, Tensor> gae_##suffix(const Tensor& rewards, const Tensor& values,         \
                                          const Tensor& mask, double gamma, double lam);       \
  std::tuple<Tensor, Tensor> masked_whiten_##suffix(const Tensor& x, const Tensor& mask,       \
                                                    bool shift_mean);                          \
  Tensor masked_whiten_backward_##suffix(const Tensor& grad_out, const Tensor& x,              \
                                         const Tensor& mask, const Tensor& stats,              \
                                         bool shift_mean);
FASTPEFT_PPO_DECLS(cpu)
#ifdef FASTPEFT_WITH_CUDA
FASTPEFT_PPO_DECLS(cuda)
#endif

// Linear cross entropy / linear token log-probs (see torch_bindings.cpp).
#define FASTPEFT_LINEAR_CROSS_ENTROPY_DECLS(suffix)                                            \
  std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_##suffix(                           \
      const Tensor& hidden, const Tensor& weight, const Tensor& labels, int64_t ignore_index,  \
      std::optional<int64_t> chunk_size, std::array<bool, 2> grad_mask);                       \
  std::tuple<Tensor, Tensor> linear_cross_entropy_backward_##suffix(                           \
      const Tensor& grad_loss, const Tensor& grad_hidden, const Tensor& grad_weight,           \
      std::array<bool, 2> output_mask);                                                        \
  std::tuple<Tensor, Tensor> linear_token_logprobs_##suffix(                                   \
      const Tensor& hidden, const Tensor& weight, const Tensor& tokens, double temperature,    \
      std::optional<int64_t> chunk_size);                                                      \
  std::tuple<Tensor, Tensor> linear_token_logprobs_backward_##suffix(                          \
      const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& tokens, \
      const Tensor& lse, double temperature, std::optional<int64_t> chunk_size,                \
      std::array<bool, 2> output_mask);

FASTPEFT_LINEAR_CROSS_ENTROPY_DECLS(cpu)
#ifdef FASTPEFT_WITH_CUDA
FASTPEFT_LINEAR_CROSS_ENTROPY_DECLS(cuda)
#endif

}  // namespace fastpeft
