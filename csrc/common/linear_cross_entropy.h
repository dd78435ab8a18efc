// The chunked LM-head losses shared by CPU and CUDA: linear_cross_entropy and
// linear_token_logprobs (semantics: csrc/torch_bindings.cpp). Host code only.
//
// Both run the same loop over row chunks of hidden [N, H] against the LM head weight [V, H]:
//   z = h_c W^T                       ATen GEMM (MKL / cuBLAS) into one [chunk, V] buffer
//   Rows::stats(z)                    per row: lse of z / T and log p(target) (fused row pass)
//   Rows::grad(z)                     in place: z <- coef_i * (softmax(z / T) - onehot(target_i))
//   grad_h_c = z W,  dW += z^T h_c    ATen GEMMs; dW accumulates in fp32 (fp64 for fp64)
// so at most chunk x V logits exist at a time. linear_cross_entropy runs the gradient part
// in its forward (coef = 1 / #non-ignored: the loss is a mean), so its backward only scales
// by grad_loss and no logits are recomputed (3 GEMMs in all, like the unfused path);
// linear_token_logprobs' gradient depends on a per-row grad_out, so its backward recomputes
// each chunk's logits from the saved lse (4 GEMMs).
//
// Rows (one per device) provides:
//   static void stats(const Tensor& z, const Tensor& targets, int64_t ignore_index,
//                     double inv_temp, Tensor& logp, Tensor& lse);
//     z [n, V] contiguous, targets [n] int64, logp / lse [n] in the accumulation dtype:
//     lse = logsumexp(z * inv_temp), logp = z[target] * inv_temp - lse (0 where ignored).
//   static void grad(Tensor& z, const Tensor& targets, const Tensor& lse, const Tensor& coef,
//                    double inv_temp);
//     z <- coef * (exp(z * inv_temp - lse) - onehot(target)) in place (no onehot where the
//     target is outside [0, V), i.e. ignored).
#pragma once

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "common/checks.h"

namespace fastpeft {
namespace lce {

// A target value no token can take (tokens are checked to lie in [0, V)).
constexpr int64_t kNoIgnore = -1;

// hidden [N, H], weight [V, H], targets [N] int64 with values in [0, V) (or ignore_index).
inline void check_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const at::Tensor& targets, const char* targets_name,
                       std::optional<int64_t> ignore_index) {
  check_dim(hidden, 2, "hidden", "[N, hidden]");
  check_dim(weight, 2, "weight", "[vocab, hidden]");
  check_same_device_dtype(hidden, weight, "weight", "hidden");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "fastpeft: weight must be [vocab, ",
              hidden.size(1), "] to match hidden's last dim, got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "fastpeft: weight must have at least one row (vocab > 0), got ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "fastpeft: ", targets_name,
              " must be [", hidden.size(0), "] (one per row of hidden), got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "fastpeft: ", targets_name,
              " must have dtype torch.int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == hidden.device(), "fastpeft: ", targets_name, " must be on ",
              hidden.device(), " like hidden, got ", targets.device());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble ||
                  (dt == at::kHalf && hidden.is_cuda()),
              "fastpeft: hidden must have dtype float32, bfloat16 or float64 (float16 on CUDA), "
              "got ", dt);
  if (targets.numel() == 0) return;
  const int64_t V = weight.size(0);
  at::Tensor bad = targets.lt(0).logical_or_(targets.ge(V));
  if (ignore_index.has_value()) bad.logical_and_(targets.ne(*ignore_index));
  if (bad.any().item<bool>()) {
    const int64_t v = targets.masked_select(bad)[0].item<int64_t>();
    if (ignore_index.has_value()) {
      TORCH_CHECK(false, "fastpeft: ", targets_name, " must be in [0, ", V, ") or ignore_index (",
                  *ignore_index, "), got ", v);
    }
    TORCH_CHECK(false, "fastpeft: ", targets_name, " must be in [0, ", V, "), got ", v);
  }
}

// Rows per chunk. Liger-Kernel's rule (chunk x V logits about the size of hidden) gives
// skinny GEMMs for a large V: each chunk's dW += z^T h_c reads and writes all of dW, so it
// takes a few hundred rows to keep that GEMM compute-bound (measured on the CPU at N = 2048,
// H = 576, V = 49152: 512 rows ~6% faster than 256, 32 rows 2x slower). So: at least 256
// rows, growing to 512 while the chunk's logits stay within 128 MB.
inline int64_t chunk_rows(std::optional<int64_t> chunk_size, int64_t N, int64_t V, int64_t H,
                          int64_t elem_size) {
  if (chunk_size.has_value()) {
    TORCH_CHECK(*chunk_size > 0, "fastpeft: chunk_size must be positive, got ", *chunk_size);
    return std::max<int64_t>(std::min(*chunk_size, N), 1);
  }
  const int64_t inc = (V + H - 1) / std::max<int64_t>(H, 1);
  int64_t liger = 1;
  while (liger < (N + inc - 1) / inc) liger *= 2;
  const int64_t by_bytes = (int64_t{128} << 20) / std::max<int64_t>(V * elem_size, 1);
  const int64_t rows = std::max({liger, int64_t{256}, std::min<int64_t>(by_bytes, 512)});
  return std::max<int64_t>(std::min(rows, N), 1);
}

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The gradient GEMMs of one chunk z [n, V] (already softmax - onehot, scaled):
// grad_h[r0 : r0 + n] = z W; grad_w_acc (+)= z^T h_c (the first chunk writes, later ones add).
inline void grad_gemms(const at::Tensor& z, const at::Tensor& hc, const at::Tensor& weight,
                       at::Tensor& grad_h, at::Tensor& grad_w_acc, int64_t r0, bool first) {
  if (grad_h.defined()) {
    at::Tensor gh = grad_h.narrow(0, r0, z.size(0));
    at::mm_out(gh, z, weight);
  }
  if (!grad_w_acc.defined()) return;
  if (grad_w_acc.scalar_type() == z.scalar_type()) {
    if (first) {
      at::mm_out(grad_w_acc, z.t(), hc);
    } else {
      grad_w_acc.addmm_(z.t(), hc);
    }
  } else {
    // bf16 / fp16. On CUDA, cuBLAS writes / accumulates the fp32 dW itself (addmm with
    // out_dtype, no bf16 partial); where that overload is refused (older torch), and on the
    // CPU (which has no such overload), the GEMM runs in the input dtype (fp32 accumulation
    // inside) and its partial is summed in fp32.
    static bool cuda_out_dtype_ok = true;
    if (z.is_cuda() && cuda_out_dtype_ok) {
      try {
        if (first) {
          at::mm_out(grad_w_acc, z.t(), hc, grad_w_acc.scalar_type());
        } else {
          at::addmm_out(grad_w_acc, grad_w_acc, z.t(), hc, grad_w_acc.scalar_type());
        }
        return;
      } catch (const c10::Error&) {
        cuda_out_dtype_ok = false;
      }
    }
    const at::Tensor part = at::mm(z.t(), hc);
    if (first) {
      grad_w_acc.copy_(part);
    } else {
      grad_w_acc.add_(part);
    }
  }
}

// The chunk loop. Computes logp / lse for every row (into the given [N] tensors) and, where
// coef is defined, the gradients into grad_h ([N, H] or undefined) and grad_w_acc ([V, H] in
// the accumulation dtype or undefined).
template <class Rows>
void run_chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                int64_t ignore_index, double inv_temp, int64_t chunk, at::Tensor& logp,
                at::Tensor& lse, const at::Tensor& coef, at::Tensor& grad_h,
                at::Tensor& grad_w_acc) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  if (N == 0) {
    if (grad_w_acc.defined()) grad_w_acc.zero_();
    return;
  }
  at::Tensor buf = at::empty({std::min(chunk, N), V}, hidden.options());
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t n = std::min(chunk, N - r0);
    at::Tensor z = buf.narrow(0, 0, n);
    const at::Tensor hc = hidden.narrow(0, r0, n), tc = targets.narrow(0, r0, n);
    at::mm_out(z, hc, weight.t());
    at::Tensor ls = lse.narrow(0, r0, n);
    if (logp.defined()) {
      at::Tensor lp = logp.narrow(0, r0, n);
      Rows::stats(z, tc, ignore_index, inv_temp, lp, ls);
    }
    if (!coef.defined()) continue;
    Rows::grad(z, tc, ls, coef.narrow(0, r0, n), inv_temp);
    grad_gemms(z, hc, weight, grad_h, grad_w_acc, r0, r0 == 0);
  }
}

// fastpeft::linear_cross_entropy: (loss, grad_hidden, grad_weight), the gradients of the
// loss computed in the same pass when grad_mask asks (else empty tensors).
template <class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    int64_t ignore_index, std::optional<int64_t> chunk_size, std::array<bool, 2> grad_mask) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = at::TensorOptions().dtype(acc_type(hidden)).device(hidden.device());
  const at::Tensor valid = labels.ne(ignore_index);
  const int64_t count = valid.sum().item<int64_t>();
  at::Tensor logp = at::empty({N}, acc), lse = at::empty({N}, acc);
  at::Tensor coef, grad_h, grad_w_acc;
  if (grad_mask[0] || grad_mask[1]) {
    coef = valid.to(acc_type(hidden)).mul_(count > 0 ? 1.0 / static_cast<double>(count) : 0.0);
    if (grad_mask[0]) grad_h = at::empty({N, H}, hidden.options());
    if (grad_mask[1]) grad_w_acc = at::empty({V, H}, acc);
  }
  const int64_t chunk = chunk_rows(chunk_size, N, V, H, hidden.element_size());
  run_chunks<Rows>(hidden, weight, labels, ignore_index, 1.0, chunk, logp, lse, coef, grad_h,
                   grad_w_acc);
  at::Tensor loss = logp.sum().div_(-static_cast<double>(std::max<int64_t>(count, 1)));
  loss = loss.to(hidden.scalar_type());
  if (!grad_h.defined()) grad_h = hidden.new_empty({0});
  at::Tensor grad_w = !grad_w_acc.defined() ? hidden.new_empty({0})
                      : grad_w_acc.scalar_type() == weight.scalar_type()
                          ? grad_w_acc
                          : grad_w_acc.to(weight.scalar_type());
  return {loss, grad_h, grad_w};
}

// fastpeft::linear_cross_entropy_backward: grad_loss times the forward's gradients.
inline std::tuple<at::Tensor, at::Tensor> cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_hidden, const at::Tensor& grad_weight,
    std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad_loss.dim() == 0, "fastpeft: grad_loss must be 0-dim, got shape ",
              grad_loss.sizes());
  auto scaled = [&](const at::Tensor& g, bool on, const char* name) {
    if (!on) return g.new_empty({0});
    TORCH_CHECK(g.dim() == 2, "fastpeft: ", name,
                " must be the 2-D gradient the forward computed (the forward ran with "
                "grad_mask off for it?), got shape ", g.sizes());
    return at::mul(g, grad_loss.to(g.scalar_type()));
  };
  return {scaled(grad_hidden, output_mask[0], "grad_hidden"),
          scaled(grad_weight, output_mask[1], "grad_weight")};
}

// fastpeft::linear_token_logprobs: (logprobs [N] in hidden's dtype, lse [N] fp32 / fp64).
template <class Rows>
std::tuple<at::Tensor, at::Tensor> token_logprobs_forward(const at::Tensor& hidden,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& tokens,
                                                          double temperature,
                                                          std::optional<int64_t> chunk_size) {
  TORCH_CHECK(temperature > 0, "fastpeft: temperature must be > 0, got ", temperature);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = at::TensorOptions().dtype(acc_type(hidden)).device(hidden.device());
  at::Tensor logp = at::empty({N}, acc), lse = at::empty({N}, acc);
  at::Tensor none, no_h, no_w;
  const int64_t chunk = chunk_rows(chunk_size, N, V, H, hidden.element_size());
  run_chunks<Rows>(hidden, weight, tokens, kNoIgnore, 1.0 / temperature, chunk, logp, lse, none,
                   no_h, no_w);
  return {logp.to(hidden.scalar_type()), lse};
}

// fastpeft::linear_token_logprobs_backward: (grad_hidden, grad_weight), the logits of each
// chunk recomputed, softmax from the saved lse.
template <class Rows>
std::tuple<at::Tensor, at::Tensor> token_logprobs_backward(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& tokens, const at::Tensor& lse, double temperature,
    std::optional<int64_t> chunk_size, std::array<bool, 2> output_mask) {
  TORCH_CHECK(temperature > 0, "fastpeft: temperature must be > 0, got ", temperature);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == N, "fastpeft: grad_out must be [", N,
              "], got ", grad_out.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N && lse.scalar_type() == acc_type(hidden),
              "fastpeft: lse must be [", N, "] ", acc_type(hidden), ", got ", lse.sizes(), " ",
              lse.scalar_type());
  const auto acc = at::TensorOptions().dtype(acc_type(hidden)).device(hidden.device());
  at::Tensor grad_h, grad_w_acc;
  if (output_mask[0]) grad_h = at::empty({N, H}, hidden.options());
  if (output_mask[1]) grad_w_acc = at::empty({V, H}, acc);
  if (output_mask[0] || output_mask[1]) {
    const at::Tensor coef = grad_out.to(acc_type(hidden)).mul(-1.0 / temperature);
    at::Tensor no_logp, lse_c = lse.contiguous();
    const int64_t chunk = chunk_rows(chunk_size, N, V, H, hidden.element_size());
    run_chunks<Rows>(hidden, weight, tokens, kNoIgnore, 1.0 / temperature, chunk, no_logp,
                     lse_c, coef, grad_h, grad_w_acc);
  }
  if (!grad_h.defined()) grad_h = hidden.new_empty({0});
  at::Tensor grad_w = !grad_w_acc.defined() ? hidden.new_empty({0})
                      : grad_w_acc.scalar_type() == weight.scalar_type()
                          ? grad_w_acc
                          : grad_w_acc.to(weight.scalar_type());
  return {grad_h, grad_w};
}

}  // namespace lce
}  // namespace fastpeft
