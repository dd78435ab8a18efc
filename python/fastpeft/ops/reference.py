"""Pure-PyTorch references: short, obviously correct, the ground truth for every kernel.

Layouts follow Hugging Face peft: lora_a is [r, in], lora_b is [out, r].
"""

import torch
import torch.nn.functional as F

# Philox4x32-7, as in csrc/common/philox.h and ops/triton/philox.py.
PHILOX_ROUNDS = 7
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a 32-bit constant a and int64 tensor b < 2^32,
    computed in 16-bit halves so no int64 product overflows."""
    lo_part = (a & 0xFFFF) * b
    hi_part = (a >> 16) * b
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _U32
    return hi, lo


def philox4x32(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Four 32-bit words (as int64, [..., 4]) per 64-bit counter, for a 64-bit seed."""
    seed &= (1 << 64) - 1
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _U32, seed >> 32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def dropout_threshold(p: float) -> int:
    return min(int(p * 2.0**32), _U32)


def philox_keep_mask(seed: int, shape: torch.Size | tuple, p: float, device=None) -> torch.Tensor:
    """The dropout keep mask of every backend: flat element i (row-major over `shape`) is kept
    when word (i & 3) of philox4x32(i >> 2, seed) is >= floor(p * 2^32)."""
    numel = 1
    for s in shape:
        numel *= s
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(counters, seed).reshape(-1)[:numel]
    return (words >= dropout_threshold(p)).reshape(shape)


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout with the counter-based mask (kept elements scaled by 1 / (1 - p))."""
    if p == 0.0:
        return x
    keep = philox_keep_mask(seed, x.shape, p, device=x.device)
    return x * keep.to(x.dtype) / (1.0 - p)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """x W^T + b + scaling * (dropout(x) A^T) B^T."""
    xd = seeded_dropout(x, dropout_p, seed) if training else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(xd, lora_a), lora_b)


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """Per-row adapter: rows with adapter_ids == j add scalings[j] * (x A_j^T) B_j^T;
    id -1 is the base layer alone. adapter_ids has x's leading shape."""
    y = F.linear(x, weight, bias)
    for j in range(lora_a.shape[0]):
        rows = (adapter_ids == j).unsqueeze(-1).to(x.dtype)
        y = y + rows * (float(scalings[j]) * F.linear(F.linear(x, lora_a[j]), lora_b[j]))
    return y


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    scale_input: bool,
) -> torch.Tensor:
    """peft's IA3: (x * l) W^T + b when scale_input (feed-forward layers), else (x W^T + b) * l.
    scale l has in_features (or out_features) elements, in any shape (peft keeps [1, in] / [out, 1])."""
    l = scale.reshape(-1)
    if scale_input:
        return F.linear(x * l, weight, bias)
    return F.linear(x, weight, bias) * l


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}
# Other names for the same functions (Hugging Face / AdapterHub spellings).
ACTIVATION_ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu_fast": "gelu_tanh"}


def canonical_activation(name: str) -> str:
    """The canonical activation name ("relu", "gelu", "gelu_tanh", "silu") or ValueError."""
    key = ACTIVATION_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ACTIVATIONS:
        known = ", ".join([*ACTIVATIONS, *ACTIVATION_ALIASES])
        raise ValueError(f"activation must be one of {known}, got {name!r}")
    return key


def adapter_bottleneck(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
    scaling: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Houlsby / Pfeiffer bottleneck: residual + scaling * (act(h Wd^T + bd) Wu^T + bu);
    the residual defaults to h."""
    act = ACTIVATIONS[canonical_activation(activation)]
    up = F.linear(act(F.linear(h, w_down, b_down)), w_up, b_up)
    return (h if residual is None else residual) + scaling * up


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q [B, Hq, T, D] over [prefix ; keys] (materialized here, as the
    ground truth). The prefix [B or 1, Hkv, P, D] is visible to every query; causal applies
    inside the sequence; attn_mask [B, T] (True = attend) hides sequence keys; query head h
    reads kv head h // (Hq / Hkv). A query that sees no key returns 0."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    P = prefix_k.shape[2]
    scale = D**-0.5 if scale is None else scale
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    visible = torch.ones(B, 1, T, P + T, dtype=torch.bool, device=q.device)
    if causal:
        visible[..., P:] &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        visible[..., P:] &= attn_mask.bool()[:, None, None, :]
    any_visible = visible.any(-1, keepdim=True)
    scores = (q @ keys.transpose(-1, -2)) * scale
    scores = torch.where(any_visible, scores.masked_fill(~visible, float("-inf")), 0.0)
    probs = torch.softmax(scores, -1) * visible
    return probs @ values


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / temperature)[..., token] (and the entropy -sum p log p of that
    distribution), in the logits' dtype."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)
# ---- PPO: the policy and value losses, GAE and whitening (TRL's formulas) ----------------------
# A masked mean over an empty mask is 0 (TRL divides by zero and gets NaN): the losses and their
# stats are then 0 with zero gradients.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (bool); 0 when the mask is empty."""
    n = mask.sum().clamp(min=1)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / n.to(x.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || ref) estimators from Schulman's note: k1 = logp - ref,
    k2 = 0.5 (logp - ref)^2, k3 = exp(ref - logp) - (ref - logp) - 1."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"kl_estimator must be one of k1, k2, k3, got {estimator!r}")


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2,
                    ref_logprobs=None, kl_coef=0.0, kl_estimator="k3"):
    """TRL's clipped surrogate max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)) plus
    kl_coef * KL(logp, ref) per token, masked token mean. Only logprobs is differentiated
    (old_logprobs, advantages and ref_logprobs are constants). Returns (loss, stats)."""
    mask = mask.bool()
    old, adv = old_logprobs.detach(), advantages.detach()
    diff = logprobs - old
    ratio = torch.exp(diff)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs.detach(), kl_estimator)
        per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).to(logprobs.dtype), mask),
            "approx_kl": 0.5 * masked_mean(diff * diff, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "kl_mean": masked_mean(kl, mask) if ref_logprobs is not None
            else torch.zeros((), dtype=logprobs.dtype, device=logprobs.device),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """TRL's clipped value loss 0.5 * masked_mean(max((v - R)^2, (clamp(v, old - clip,
    old + clip) - R)^2)); only values is differentiated. Returns (loss, {"vf_clipfrac"})."""
    mask = mask.bool()
    old, ret = old_values.detach(), returns.detach()
    clipped = torch.maximum(torch.minimum(values, old + clip), old - clip)
    l1 = (values - ret) ** 2
    l2 = (clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).to(values.dtype), mask)
    return loss, {"vf_clipfrac": clipfrac}


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation, the Python loop over time (as TRL's PPO trainer).
    rewards / values / mask [..., T]. Positions where mask is 0 are skipped: they get
    advantage and return 0 and pass the running advantage and next value through unchanged,
    so with right padding the value after the last valid token is 0 (no bootstrap).
    Returns (advantages, returns = advantages + values); no gradient."""
    rewards, values, mask = rewards.detach(), values.detach(), mask.bool()
    T = rewards.shape[-1]
    next_value = rewards.new_zeros(rewards.shape[:-1])
    last = rewards.new_zeros(rewards.shape[:-1])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        m = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        last = torch.where(m, delta + gamma * lam * last, last)
        next_value = torch.where(m, values[..., t], next_value)
        advantages[..., t] = torch.where(m, last, torch.zeros_like(last))
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def masked_whiten(x, mask, shift_mean=True):
    """TRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8) with the mean and the unbiased
    variance over the masked entries, applied to every entry (the unmasked ones too); with
    shift_mean=False the mean is added back. The Bessel divisor n - 1 is taken as at least 1
    (TRL: NaN for n = 1, an error for n = 0), so one entry gives var 0 and an empty mask
    mean 0, var 0."""
    mask = mask.bool()
    n = mask.sum()
    mean = masked_mean(x, mask)
    centered = x - mean
    sq = torch.where(mask, centered * centered, torch.zeros_like(x)).sum()
    var = sq / (n - 1).clamp(min=1).to(x.dtype)
    out = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out

def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None):
    """Mean cross entropy of hidden @ weight^T against labels over the labels that are not
    ignore_index (0 when all are). chunk_size is ignored: the full logits are materialized."""
    logits = hidden @ weight.T
    labels = labels.reshape(-1)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, weight.shape[0]), labels, ignore_index=ignore_index, reduction="sum"
    )
    return total / (labels != ignore_index).sum().clamp(min=1)


def linear_token_logprobs(hidden, weight, tokens, temperature=1.0, chunk_size=None):
    """log_softmax(hidden @ weight^T / temperature) at tokens, per position."""
    logits = (hidden @ weight.T) / temperature
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
