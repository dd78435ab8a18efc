"""token_logprobs: log p(token) per position (and the entropy) without a [..., V] log-softmax:
one pass over each row of logits with an online log-sum-exp, and a backward that recomputes the
softmax from the saved log-sum-exp."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, reference


def _check_args(logits, tokens, temperature, return_entropy) -> None:
    _validate.check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must be [..., vocab] with vocab >= 1, got shape {tuple(logits.shape)}"
        )
    _validate.check_float_dtype(logits, "logits")
    _validate.check_tensor("tokens", tokens)
    if tokens.dtype != torch.int64:
        raise ValueError(f"tokens must have dtype torch.int64, got {tokens.dtype}")
    if tokens.device != logits.device:
        raise ValueError(f"tokens must be on {logits.device} like logits, got {tokens.device}")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"tokens must have logits' leading shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(tokens.shape)}"
        )
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    # On the CPU an out-of-range token is an error here (and in the C++ kernel). On CUDA this
    # check would cost a device sync per call: the CUDA kernel writes NaN for such a row instead.
    if tokens.device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(tokens)
        if lo.item() < 0 or hi.item() >= logits.shape[-1]:
            bad = lo.item() if lo.item() < 0 else hi.item()
            raise ValueError(
                f"tokens must be in [0, {logits.shape[-1]}) (the vocab of logits), got {bad}"
            )


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the given tokens under softmax(logits / temperature).

    Args:
        logits: [..., V] float32 / bfloat16 (float16 too on CUDA; float64 for gradcheck).
        tokens: [...] int64 in [0, V) (logits' leading shape). On the CPU an out-of-range
            token raises; on CUDA (to avoid a device sync) its row's log-prob is NaN.
        temperature: > 0; the logits are divided by it (as TRL and vLLM sample).
        return_entropy: also return the entropy -sum p log p of each position's distribution.

    Returns logp [...] (and entropy [...]) in the logits' dtype, computed in fp32 (fp64 for fp64
    logits), as TRL's selective_log_softmax returns the logits' dtype. The backward keeps only
    the logits and three fp32 numbers per row (the max logit, the log-sum-exp and the mean of
    the scaled logits under p); the unfused log_softmax + gather keeps a second [..., V] tensor.
    """
    _check_args(logits, tokens, temperature, return_entropy)
    op = _dispatch.kernel("token_logprobs", logits.device, _eager)
    if op is None:
        return reference.token_logprobs(logits, tokens, temperature, return_entropy)
    lead, v = logits.shape[:-1], logits.shape[-1]
    logp, entropy, _ = op(
        logits.reshape(-1, v).contiguous(), tokens.reshape(-1).contiguous(), float(temperature),
        return_entropy,
    )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)


def _fake_forward(logits, tokens, temperature, return_entropy):
    torch._check(logits.dim() == 2 and tokens.dim() == 1 and tokens.shape[0] == logits.shape[0])
    n = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (logits.new_empty(n), logits.new_empty(n if return_entropy else 0),
            logits.new_empty(n, 3, dtype=acc))


def _fake_backward(grad_logp, grad_entropy, logits, tokens, stats, temperature):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, return_entropy = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, tokens, stats)
    ctx.temperature, ctx.return_entropy = temperature, return_entropy
    ctx.mark_non_differentiable(stats)
    if not return_entropy:
        ctx.mark_non_differentiable(entropy)
    # A loss may use only the entropy: its gradient must still flow when logp's is undefined
    # (the shared guard returns no gradients when the first output's grad is None).
    ctx.set_materialize_grads(True)


def _make_backward(backward_op):
    def backward(ctx, grad_logp, grad_entropy, grad_stats):
        logits, tokens, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_entropy = grad_entropy.contiguous() if ctx.return_entropy else None
        grad = backward_op(grad_logp.contiguous(), grad_entropy, logits, tokens, stats,
                           ctx.temperature)
        return grad, None, None, None

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "token_logprobs", _fake_forward, _fake_backward, _setup_context, _make_backward,
        triton=False,
    )
