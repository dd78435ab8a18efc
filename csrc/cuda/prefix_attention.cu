// CUDA implementation of fastpeft::prefix_attention and its backward (semantics:
// csrc/torch_bindings.cpp), built on PyTorch's own memory-efficient attention kernels
// (at::_scaled_dot_product_efficient_attention and its _backward, the cutlass kernels of
// xformers), merged by log-sum-exp as ring attention merges its blocks.
//
// Forward: attention over [prefix ; sequence] is two attentions of the same queries,
//   part 1: q over the prefix keys     no mask, not causal      -> o1, lse1
//   part 2: q over the sequence keys   causal, key padding mask -> o2, lse2
//   lse = logaddexp(lse1, lse2), out = exp(lse1 - lse) o1 + exp(lse2 - lse) o2
// (one merge kernel). The [B, H, P + T, D] concat is never built; the prefix is expanded to the
// batch by a stride-0 view, and to the q heads (GQA) by a copy only when Hq > Hkv (the kernels
// take one head count; the prefix copy is [B or 1, Hq, P, D], P is small; the sequence k / v
// copy [B, Hq, T, D] is what PyTorch's own sdpa does for GQA on this kernel).
// Backward: each part's backward op run with the MERGED out and lse: p_ij = exp(s_ij - lse_i)
// is then the probability over all keys and delta_i = sum_d dO_i O_i the full one, so the parts'
// dq add up to dq, and their dk / dv are exact. Head-repeated / batch-expanded grads are summed
// back over the GQA group (and over the batch when the prefix batch is 1).
//
// Limits of the ATen kernels (checked below with clear messages):
//   - dtypes float32, float16, bfloat16 (no float64 kernel);
//   - head_dim a multiple of 8 (16-bit) or 4 (float32): their aligned kernels (bfloat16 has only
//     aligned ones) read q / k / v rows with 128-bit vector loads; sdpa imposes the same rule;
//   - batch and q_heads at most 65535 (grid dimensions z and y);
//   - 16-byte aligned data pointers (tensors that are not are copied);
//   - the additive bias (key padding mask) has a row length padded to a multiple of 16 and all
//     strides but the last multiples of the alignment (stride 0 where expanded), as sdpa's
//     preprocess_mask builds it;
//   - the backward reads `out` with a row stride of H * D ([B, T, H, D] memory), and the lse
//     padded to a multiple of 32 queries with +inf (as the forward writes it).
// Queries that see no sequence key (all masked) are taken from the mask itself, not from the
// kernel's lse (recent kernels write 0 there, older ones NaN).
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/prefix_attention_checks.h"
#include "ops.h"

namespace fastpeft {

namespace {

constexpr int64_t kLseAlign = 32;   // kAlignLSE of the memory-efficient kernels
constexpr int64_t kBiasAlign = 16;  // bias row padding (sdpa pads to a multiple of 8 or 16)
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kWarpsPerBlock = 8;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void check_cuda_attention_limits(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() != at::kDouble,
              "fastpeft: prefix_attention (CUDA) supports float32, bfloat16 and float16 q: it "
              "runs on PyTorch's memory-efficient attention kernels, which have no float64 "
              "variant; got float64 (use the CPU kernel or the reference backend for float64)");
  const int64_t D = q.size(3);
  const int64_t align = q.scalar_type() == at::kFloat ? 4 : 8;
  TORCH_CHECK(D > 0 && D % align == 0, "fastpeft: prefix_attention (CUDA) needs head_dim to be "
              "a positive multiple of ", align, " for ", q.scalar_type(),
              " q (the memory-efficient attention kernels' alignment), got head_dim ", D);
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && q.size(1) <= kMaxGridYZ,
              "fastpeft: prefix_attention (CUDA) supports batch and q_heads up to ", kMaxGridYZ,
              " (CUDA grid limits of the attention kernels), got batch ", q.size(0),
              " and q_heads ", q.size(1));
}

// t itself when its data pointer is 16-byte aligned (the kernels' vector loads), else a copy.
at::Tensor aligned(const at::Tensor& t) {
  const auto addr = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  return addr % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

// [Bt, Hkv, L, D] -> [B, Hq, L, D] (Bt in {1, B}): kv head j serves q heads j * G .. j * G + G - 1
// (a copy when G > 1); batch 1 is expanded by a stride-0 view unless `materialize` (the backward
// materializes, so that no gradient buffer is ever allocated with the input's 0 strides).
at::Tensor to_q_heads(const at::Tensor& t, int64_t B, int64_t G, bool materialize) {
  at::Tensor r = G > 1 ? t.repeat_interleave(G, 1) : t;
  r = r.expand({B, r.size(1), r.size(2), r.size(3)});
  return aligned(materialize ? r.contiguous() : r);
}

// Gradient of to_q_heads' result [B, Hq, L, D] -> [Bt, Hkv, L, D]: sum over each kv head's group
// of G q heads, and over the batch when the original batch was 1 (contiguous result).
at::Tensor from_q_heads(const at::Tensor& g, int64_t Hkv, int64_t G, bool sum_batch) {
  if (G == 1 && !sum_batch) return g.contiguous();
  const at::Tensor g5 = g.unflatten(1, {Hkv, G});  // [B, Hkv, G, L, D]
  const at::Tensor s = sum_batch ? at::sum(g5, {0, 2}, /*keepdim=*/true)
                                 : at::sum(g5, {2}, /*keepdim=*/true);
  return s.squeeze(2).contiguous();
}

// The additive bias of the sequence part: 0 where attn_mask is true, -inf where false, as
// [B, Hq, T, T] with strides (Tpad, 0, 0, 1): one row per batch, padded to a multiple of 16
// (the layout sdpa's preprocess_mask gives a [B, 1, 1, T] mask).
at::Tensor key_padding_bias(const at::Tensor& mask, int64_t Hq, const at::TensorOptions& opts) {
  const int64_t B = mask.size(0), T = mask.size(1);
  const int64_t Tpad = round_up(T, kBiasAlign);
  at::Tensor base = at::zeros({B, Tpad}, opts);
  base.narrow(1, 0, T).masked_fill_(mask.logical_not(), -std::numeric_limits<double>::infinity());
  return base.as_strided({B, Hq, T, T}, {Tpad, 0, 0, 1});
}

// visible[b, t]: query t sees at least one sequence key under the mask (bool [B, T]).
at::Tensor visible_rows(const at::Tensor& mask, bool causal) {
  if (causal) return at::cumsum(mask, 1, at::kInt).gt(0).contiguous();
  return mask.any(1, /*keepdim=*/true).expand_as(mask).contiguous();
}

// One part's output o [B, H, T, D] (last dim contiguous, any other strides) and its lse
// [B, H, >= T] (fp32, last dim contiguous).
template <typename scalar_t>
struct Part {
  const scalar_t* o = nullptr;  // nullptr: the part is absent (P = 0)
  int64_t o_sb = 0, o_sh = 0, o_st = 0;
  const float* lse = nullptr;
  int64_t l_sb = 0, l_sh = 0;
};

template <typename scalar_t>
Part<scalar_t> make_part(const at::Tensor& o, const at::Tensor& lse) {
  TORCH_INTERNAL_ASSERT(o.dim() == 4 && o.stride(3) == 1 && lse.dim() == 3 &&
                        lse.stride(2) == 1 && lse.scalar_type() == at::kFloat &&
                        lse.size(2) >= o.size(2));
  return {o.const_data_ptr<scalar_t>(), o.stride(0), o.stride(1), o.stride(2),
          lse.const_data_ptr<float>(), lse.stride(0), lse.stride(1)};
}

// One warp per query row (b, h, t) of out [B, H, T, D] / lse [B, H, T] (contiguous):
// lse = logaddexp(lse1, lse2); out = exp(lse1 - lse) o1 + exp(lse2 - lse) o2. Part 1 is used when
// present; part 2 where visible[b, t] (all rows when visible is nullptr). No part: out = 0,
// lse = +inf. An unused part's o / lse are never read (they may hold NaN).
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    lse_merge_kernel(Part<scalar_t> p1, Part<scalar_t> p2, const bool* __restrict__ visible,
                     scalar_t* __restrict__ out, float* __restrict__ lse, int64_t H, int64_t T,
                     int64_t D, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int64_t t = row % T;
  const int64_t bh = row / T;
  const int64_t h = bh % H;
  const int64_t b = bh / H;
  const bool use1 = p1.o != nullptr;
  const bool use2 = visible == nullptr || visible[b * T + t];
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float l1 = use1 ? p1.lse[b * p1.l_sb + h * p1.l_sh + t] : -kInf;
  const float l2 = use2 ? p2.lse[b * p2.l_sb + h * p2.l_sh + t] : -kInf;
  scalar_t* orow = out + row * D;
  const float m = fmaxf(l1, l2);
  if ((!use1 && !use2) || m == -kInf) {  // no visible key
    for (int64_t d = lane; d < D; d += 32) orow[d] = static_cast<scalar_t>(0.f);
    if (lane == 0) lse[row] = kInf;
    return;
  }
  const float total = m + logf(expf(l1 - m) + expf(l2 - m));
  const float w1 = use1 ? expf(l1 - total) : 0.f;
  const float w2 = use2 ? expf(l2 - total) : 0.f;
  const scalar_t* r1 = use1 ? p1.o + b * p1.o_sb + h * p1.o_sh + t * p1.o_st : nullptr;
  const scalar_t* r2 = use2 ? p2.o + b * p2.o_sb + h * p2.o_sh + t * p2.o_st : nullptr;
  for (int64_t d = lane; d < D; d += 32) {
    float v = 0.f;
    if (use1) v += w1 * static_cast<float>(r1[d]);
    if (use2) v += w2 * static_cast<float>(r2[d]);
    orow[d] = static_cast<scalar_t>(v);
  }
  if (lane == 0) lse[row] = total;
}

}  // namespace

std::tuple<Tensor, Tensor> prefix_attention_cuda(const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& prefix_k_in,
                                                 const Tensor& prefix_v_in,
                                                 const std::optional<Tensor>& attn_mask,
                                                 bool causal, double scale) {
  check_cuda_input(q_in, "prefix_attention");
  check_prefix_attention_args(q_in, k_in, v_in, prefix_k_in, prefix_v_in, attn_mask);
  check_cuda_attention_limits(q_in);
  c10::cuda::CUDAGuard device_guard(q_in.device());

  const int64_t B = q_in.size(0), Hq = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), G = Hq / Hkv, P = prefix_k_in.size(2);
  Tensor out = at::empty({B, Hq, T, D}, q_in.options());
  Tensor lse = at::empty({B, Hq, T}, q_in.options().dtype(at::kFloat));
  const int64_t rows = B * Hq * T;
  if (rows == 0) return {out, lse};

  const Tensor q = aligned(q_in.contiguous());
  const std::optional<double> sc = scale;

  // Part 1: the prefix, visible to every query.
  Tensor o1, lse1;
  if (P > 0) {
    const Tensor pk = to_q_heads(prefix_k_in.contiguous(), B, G, /*materialize=*/false);
    const Tensor pv = to_q_heads(prefix_v_in.contiguous(), B, G, /*materialize=*/false);
    std::tie(o1, lse1, std::ignore, std::ignore) = at::_scaled_dot_product_efficient_attention(
        q, pk, pv, std::nullopt, /*compute_log_sumexp=*/true, /*dropout_p=*/0.0,
        /*is_causal=*/false, sc);
  }

  // Part 2: the sequence, causal and / or key padding mask.
  const Tensor k = to_q_heads(k_in.contiguous(), B, G, /*materialize=*/false);
  const Tensor v = to_q_heads(v_in.contiguous(), B, G, /*materialize=*/false);
  std::optional<Tensor> bias;
  Tensor visible;
  if (attn_mask.has_value()) {
    bias = key_padding_bias(attn_mask->contiguous(), Hq, q.options());
    visible = visible_rows(attn_mask->contiguous(), causal);
  }
  Tensor o2, lse2;
  std::tie(o2, lse2, std::ignore, std::ignore) = at::_scaled_dot_product_efficient_attention(
      q, k, v, bias, /*compute_log_sumexp=*/true, /*dropout_p=*/0.0, causal, sc);

  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "fastpeft: prefix_attention: too many query rows (", rows,
              ") for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "fastpeft_prefix_attention_merge", [&] {
    const Part<scalar_t> part1 = P > 0 ? make_part<scalar_t>(o1, lse1) : Part<scalar_t>{};
    const Part<scalar_t> part2 = make_part<scalar_t>(o2, lse2);
    lse_merge_kernel<scalar_t><<<static_cast<unsigned>(blocks), dim3(32, kWarpsPerBlock), 0,
                                 stream>>>(
        part1, part2, visible.defined() ? visible.const_data_ptr<bool>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), Hq, T, D, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

Grads5 prefix_attention_backward_cuda(const Tensor& grad_out_in, const Tensor& q_in,
                                      const Tensor& k_in, const Tensor& v_in,
                                      const Tensor& prefix_k_in, const Tensor& prefix_v_in,
                                      const std::optional<Tensor>& attn_mask,
                                      const Tensor& out_in, const Tensor& lse_in, bool causal,
                                      double scale) {
  check_cuda_input(q_in, "prefix_attention");
  check_prefix_attention_args(q_in, k_in, v_in, prefix_k_in, prefix_v_in, attn_mask);
  check_prefix_attention_backward_args(grad_out_in, q_in, out_in, lse_in);
  check_cuda_attention_limits(q_in);
  c10::cuda::CUDAGuard device_guard(q_in.device());

  const int64_t B = q_in.size(0), Hq = q_in.size(1), T = q_in.size(2);
  const int64_t Hkv = k_in.size(1), G = Hq / Hkv, P = prefix_k_in.size(2);
  const bool prefix_shared = prefix_k_in.size(0) == 1;
  auto zeros_like = [](const Tensor& t) { return at::zeros(t.sizes(), t.options()); };
  if (B * Hq * T == 0) {
    return {zeros_like(q_in), zeros_like(k_in), zeros_like(v_in), zeros_like(prefix_k_in),
            zeros_like(prefix_v_in)};
  }

  const Tensor q = aligned(q_in.contiguous());
  const std::optional<double> sc = scale;
  // The kernels want grad_out and out in [B, T, H, D] memory (the backward reads out with a
  // row stride of H * D): one transposed copy of each, shared by both parts.
  const Tensor go = grad_out_in.transpose(1, 2).contiguous().transpose(1, 2);
  const Tensor o = out_in.transpose(1, 2).contiguous().transpose(1, 2);
  // The merged lse in the kernels' layout: [B, Hq, T rounded up to 32], padded with +inf.
  Tensor lse = at::full({B, Hq, round_up(T, kLseAlign)}, std::numeric_limits<double>::infinity(),
                        q.options().dtype(at::kFloat));
  lse.narrow(2, 0, T).copy_(lse_in);
  const Tensor philox = at::empty({0}, q.options().dtype(at::kLong));  // unused: no dropout
  const std::array<bool, 4> grad_mask{true, true, true, false};

  // Part 2: the sequence keys.
  const Tensor k = to_q_heads(k_in.contiguous(), B, G, /*materialize=*/true);
  const Tensor v = to_q_heads(v_in.contiguous(), B, G, /*materialize=*/true);
  const Tensor bias = attn_mask.has_value()
                          ? key_padding_bias(attn_mask->contiguous(), Hq, q.options())
                          : Tensor();
  auto [dq2, dk2, dv2, db2] = at::_scaled_dot_product_efficient_attention_backward(
      go, q, k, v, bias, o, lse, philox, philox, /*dropout_p=*/0.0, grad_mask, causal, sc);
  const Tensor dk = from_q_heads(dk2, Hkv, G, /*sum_batch=*/false);
  const Tensor dv = from_q_heads(dv2, Hkv, G, /*sum_batch=*/false);

  // Part 1: the prefix keys.
  if (P == 0) {
    return {dq2.contiguous(), dk, dv, zeros_like(prefix_k_in), zeros_like(prefix_v_in)};
  }
  const Tensor pk = to_q_heads(prefix_k_in.contiguous(), B, G, /*materialize=*/true);
  const Tensor pv = to_q_heads(prefix_v_in.contiguous(), B, G, /*materialize=*/true);
  auto [dq1, dpk, dpv, db1] = at::_scaled_dot_product_efficient_attention_backward(
      go, q, pk, pv, Tensor(), o, lse, philox, philox, /*dropout_p=*/0.0, grad_mask,
      /*is_causal=*/false, sc);
  Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::add_out(dq, dq1, dq2);
  return {dq, dk, dv, from_q_heads(dpk, Hkv, G, prefix_shared),
          from_q_heads(dpv, Hkv, G, prefix_shared)};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("prefix_attention", &fastpeft::prefix_attention_cuda);
  m.impl("prefix_attention_backward", &fastpeft::prefix_attention_backward_cuda);
}
