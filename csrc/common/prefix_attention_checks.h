// Input checks of prefix_attention, shared by its CPU and CUDA kernels.
#pragma once

#include "common/checks.h"

namespace fastpeft {

// q [B, Hq, T, D]; k, v [B, Hkv, T, D]; prefix_k, prefix_v [B or 1, Hkv, P, D];
// attn_mask [B, T] bool or none; Hq a multiple of Hkv.
inline void check_prefix_attention_args(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& prefix_k,
                                        const at::Tensor& prefix_v,
                                        const std::optional<at::Tensor>& attn_mask) {
  check_dim(q, 4, "q", "[batch, q_heads, seq, head_dim]");
  check_dim(k, 4, "k", "[batch, kv_heads, seq, head_dim]");
  check_dim(v, 4, "v", "[batch, kv_heads, seq, head_dim]");
  check_dim(prefix_k, 4, "prefix_k", "[batch or 1, kv_heads, prefix_len, head_dim]");
  check_dim(prefix_v, 4, "prefix_v", "[batch or 1, kv_heads, prefix_len, head_dim]");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&prefix_k, "prefix_k"},
                         {&prefix_v, "prefix_v"}}) {
    check_same_device_dtype(q, *t, name, "q");
  }
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == T && k.size(3) == D, "fastpeft: k must be [", B,
              ", kv_heads, ", T, ", ", D, "] to match q, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fastpeft: v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fastpeft: q_heads (", Hq,
              ") must be a multiple of kv_heads (", Hkv, ")");
  const int64_t Bp = prefix_k.size(0);
  TORCH_CHECK((Bp == B || Bp == 1) && prefix_k.size(1) == Hkv && prefix_k.size(3) == D,
              "fastpeft: prefix_k must be [", B, " or 1, ", Hkv, ", prefix_len, ", D, "], got ",
              prefix_k.sizes());
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), "fastpeft: prefix_v must have prefix_k's shape ",
              prefix_k.sizes(), ", got ", prefix_v.sizes());
  if (attn_mask.has_value()) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool && attn_mask->device() == q.device(),
                "fastpeft: attn_mask must be a bool tensor on ", q.device(), ", got ",
                attn_mask->scalar_type(), " on ", attn_mask->device());
    TORCH_CHECK(attn_mask->dim() == 2 && attn_mask->size(0) == B && attn_mask->size(1) == T,
                "fastpeft: attn_mask must be [", B, ", ", T, "] (batch, seq), got ",
                attn_mask->sizes());
  }
}

// The backward's extra tensors: grad_out and out like q, lse [B, Hq, T] (fp32, fp64 for fp64 q).
inline void check_prefix_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                                 const at::Tensor& out, const at::Tensor& lse) {
  check_same_device_dtype(q, grad_out, "grad_out", "q");
  check_same_device_dtype(q, out, "out", "q");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "fastpeft: grad_out must have q's shape ",
              q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "fastpeft: out must have q's shape ", q.sizes(),
              ", got ", out.sizes());
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == lse_type && lse.device() == q.device() && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "fastpeft: lse must be ", lse_type, " [", q.size(0), ", ", q.size(1), ", ",
              q.size(2), "] on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes(),
              " on ", lse.device());
}

}  // namespace fastpeft
