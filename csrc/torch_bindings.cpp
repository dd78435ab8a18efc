// Every fastpeft op schema. Each kernel file registers its own implementations:
// csrc/cpu/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA, and the Triton ones from
// python/fastpeft/ops/triton/<op>.py (the *_triton ops, for CPU under the interpreter and CUDA).
#include <torch/library.h>

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

  // IA3 linear, x [M, K], weight [N, K], scale [K] (scale_input) or [N]:
  //   scale_input:  y = (x * l) W^T + b;   else  y = (x W^T + b) * l.
  // Returns (y, unscaled): unscaled = x W^T + b [M, N] when !scale_input && keep_unscaled
  // (saved for grad_scale instead of x), otherwise a 1-D empty tensor.
  m.def(
      "ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input, "
      "bool keep_unscaled) -> (Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias, grad_scale). unscaled is [M, N] or a 1-D empty tensor
  // (not kept); x is [M, K], or 1-D empty when neither grad_weight nor (without unscaled)
  // grad_scale is asked for. bias is needed for grad_scale when only x is given.
  m.def(
      "ia3_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor scale, "
      "Tensor unscaled, bool scale_input, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // Bottleneck adapter, h [M, D], w_down [R, D], w_up [D, R], residual [M, D] or None (= h):
  //   out = residual + scaling * (act(h Wd^T + bd) Wu^T + bu).
  // Returns (out, z) with z = h Wd^T + bd [M, R], the pre-activation kept for the backward.
  // activation: "relu", "gelu" (erf), "gelu_tanh", "silu".
  m.def(
      "adapter_bottleneck(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "str activation, float scaling, Tensor? residual) -> (Tensor, Tensor)");
  // (grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up); grad_h includes grad_out when
  // residual_is_h (the grad of a separate residual is grad_out itself).
  m.def(
      "adapter_bottleneck_backward(Tensor grad_out, Tensor h, Tensor w_down, Tensor w_up, "
      "Tensor z, str activation, float scaling, bool residual_is_h, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Attention over [prefix ; keys] without the concat. q [B, Hq, T, D], k / v [B, Hkv, T, D],
  // prefix_k / prefix_v [B or 1, Hkv, P, D], attn_mask [B, T] bool (True = attend) or None.
  // Query head h reads kv head h / (Hq / Hkv). The prefix is visible to every query; causal
  // applies inside the sequence. Returns (out [B, Hq, T, D], lse [B, Hq, T]); lse is fp32
  // (fp64 for fp64 inputs) and +inf for a query that sees no key (its output is 0).
  m.def(
      "prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? attn_mask, bool causal, float scale) -> (Tensor, Tensor)");
  // (grad_q, grad_k, grad_v, grad_prefix_k, grad_prefix_v); prefix grads have the prefix's
  // shape (summed over the batch when its batch is 1).
  m.def(
      "prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor prefix_k, Tensor prefix_v, Tensor? attn_mask, Tensor out, Tensor lse, "
      "bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The Triton implementations (kernels in python/fastpeft/ops/triton), same schemas.
  m.def(
      "lora_linear_triton(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_triton_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor lora_t, float scaling, float dropout_p, Tensor seed, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ia3_linear_triton(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input, "
      "bool keep_unscaled) -> (Tensor, Tensor)");
  m.def(
      "ia3_linear_triton_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor scale, Tensor unscaled, bool scale_input, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "adapter_bottleneck_triton(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, "
      "Tensor? b_up, str activation, float scaling, Tensor? residual) -> (Tensor, Tensor)");
  m.def(
      "adapter_bottleneck_triton_backward(Tensor grad_out, Tensor h, Tensor w_down, "
      "Tensor w_up, Tensor z, str activation, float scaling, bool residual_is_h, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prefix_attention_triton(Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
      "Tensor prefix_v, Tensor? attn_mask, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_attention_triton_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor prefix_k, Tensor prefix_v, Tensor? attn_mask, Tensor out, Tensor lse, "
      "bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Log-probs of chosen tokens without a [N, V] log-softmax. logits [N, V], tokens [N] int64 in
  // [0, V); z = logits / temperature. Returns (logp [N], entropy [N] or [0] when
  // !return_entropy, stats [N, 3]): logp = z[token] - logsumexp(z), entropy = -sum p log p, both
  // in logits' dtype (computed in fp32; fp64 for fp64); stats fp32 (fp64 for fp64) holds per row
  // (m = max logits, log sum exp(d), E_p[d]) with d = (logits - m) / temperature (E_p[d] only
  // when return_entropy, else 0): all the backward keeps besides logits and tokens.
  m.def(
      "token_logprobs(Tensor logits, Tensor tokens, float temperature, bool return_entropy) "
      "-> (Tensor, Tensor, Tensor)");
  // grad_logits = ((onehot(token) - p) grad_logp - p (z - E_p[z]) grad_entropy) / temperature,
  // p recomputed from the saved stats. grad_entropy: [N] or None (it needs the stats of a
  // return_entropy forward).
  m.def(
      "token_logprobs_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, "
      "Tensor tokens, Tensor stats, float temperature) -> Tensor");
  // PPO's clipped surrogate over N tokens (the wrapper flattens), mask bool [N]:
  //   loss = masked_mean(max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)) + kl_coef * kl),
  //   r = exp(logprobs - old_logprobs), kl per kl_estimator ("k1", "k2", "k3") against
  //   ref_logprobs (no KL term when None). Returns (loss [], stats [4] = clipfrac, approx_kl,
  //   ratio_mean, kl_mean, grad [N] = d loss / d logprobs), all in logprobs' dtype; an empty
  //   mask gives 0 everywhere. Only logprobs is differentiable.
  m.def(
      "ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
      "Tensor? ref_logprobs, float clip_low, float clip_high, float kl_coef, str kl_estimator) "
      "-> (Tensor, Tensor, Tensor)");
  // grad_loss * grad (grad saved by the forward).
  m.def("ppo_policy_loss_backward(Tensor grad_loss, Tensor grad) -> Tensor");
  // PPO's clipped value loss 0.5 * masked_mean(max((v - R)^2, (clamp(v, old +- clip) - R)^2)):
  // (loss [], stats [1] = vf_clipfrac, grad [N] = d loss / d values).
  m.def(
      "ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_backward(Tensor grad_loss, Tensor grad) -> Tensor");
  // GAE per row of [B, T] (reverse scan); mask-0 positions get 0 and pass the running advantage
  // and the next value through. Returns (advantages, returns = advantages + values). No grad.
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // TRL's masked_whiten over x [N]: (x - mean) * rsqrt(var + 1e-8) (+ mean unless shift_mean),
  // mean and unbiased var over the mask (divisor max(n - 1, 1)). Returns (out, stats [4] =
  // mean, rstd, 1 / max(n, 1), 1 / max(n - 1, 1)), stats fp32 (fp64 for fp64 x).
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean) -> (Tensor, Tensor)");
  m.def(
      "masked_whiten_backward(Tensor grad_out, Tensor x, Tensor mask, Tensor stats, "
      "bool shift_mean) -> Tensor");

  // Mean cross entropy of the logits hidden [N, H] @ weight [V, H]^T against labels [N] int64
  // (ignore_index skipped; 0 when all are), chunked over rows: at most chunk_size x V logits
  // at a time (chunk_size None: a default from N, V, H). Returns (loss, grad_hidden,
  // grad_weight): where grad_mask asks, the loss's gradients, computed chunk by chunk in the
  // same pass (else empty tensors).
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, "
      "int? chunk_size, bool[2] grad_mask) -> (Tensor, Tensor, Tensor)");
  // Its backward: grad_loss times the forward's gradients (grad_hidden, grad_weight).
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor grad_hidden, Tensor grad_weight, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // log_softmax(hidden @ weight^T / temperature)[tokens] per row, chunked like
  // linear_cross_entropy. Returns (logprobs [N], lse [N] fp32 (fp64 for fp64), kept for the
  // backward).
  m.def(
      "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor tokens, float temperature, "
      "int? chunk_size) -> (Tensor, Tensor)");
  // Its backward (grad_hidden, grad_weight): each chunk's logits recomputed.
  m.def(
      "linear_token_logprobs_backward(Tensor grad_out, Tensor hidden, Tensor weight, "
      "Tensor tokens, Tensor lse, float temperature, int? chunk_size, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
}
