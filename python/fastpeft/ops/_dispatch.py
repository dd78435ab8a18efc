"""The plumbing every fused op shares: picking the implementation for a call, and registering
fake kernels plus autograd for an op and its Triton twin (the backward itself a custom op)."""

import importlib
import os
from collections.abc import Callable

import torch

from fastpeft import _ext
from fastpeft.ops import _backend


def kernel(name: str, device: torch.device, eager: Callable | None) -> Callable | None:
    """The callable to run fastpeft::<name> on `device`, or None when the reference backend is
    selected. `eager` is the op's autograd Function (fastest in eager mode); under
    torch.compile the registered op itself is returned, so the compiler can trace it."""
    impl = _backend.implementation(name, device)
    if impl == "reference":
        return None
    _ext.require_extension()
    if impl == "triton" and not hasattr(torch.ops.fastpeft, name + "_triton"):
        impl = "cpp"  # an op without a Triton kernel runs its C++ kernel (see set_backend)
    if impl == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                f"got tensors on {device}"
            )
        importlib.import_module(f"fastpeft.ops.triton.{name}").register()
        return getattr(torch.ops.fastpeft, name + "_triton").default
    if eager is None or torch.compiler.is_compiling():
        return getattr(torch.ops.fastpeft, name).default
    return eager


def register(name: str, fake_forward, fake_backward, setup_context, make_backward,
             triton: bool = True) -> Callable:
    """Register fakes and autograd for fastpeft::<name> and (when `triton`) its Triton twin
    fastpeft::<name>_triton, where make_backward(backward_op) builds the autograd backward
    around the op's backward op.
    Returns the eager `apply` of an autograd Function running fastpeft::<name> with the same
    formula, without torch.library's Python autograd layer (tens of us per call)."""
    def setup(ctx, inputs, output):
        # The ops' extra outputs (saved for the backward) are non-differentiable: no zero
        # gradient needs to be materialized for them.
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    n_inputs = len(getattr(torch.ops.fastpeft, name).default._schema.arguments)

    def with_undefined_grad(backward):
        # Without materialized grads, the main output's grad may be None too: no gradients.
        def guarded(ctx, grad_out, *rest):
            if grad_out is None:
                return (None,) * n_inputs
            return backward(ctx, grad_out, *rest)

        return guarded

    for op in (name, name + "_triton") if triton else (name,):
        torch.library.register_fake(f"fastpeft::{op}")(fake_forward)
        torch.library.register_fake(f"fastpeft::{op}_backward")(fake_backward)
        backward_op = getattr(torch.ops.fastpeft, op + "_backward").default
        torch.library.register_autograd(
            f"fastpeft::{op}", with_undefined_grad(make_backward(backward_op)),
            setup_context=setup
        )
    forward_op = getattr(torch.ops.fastpeft, name).default
    backward = with_undefined_grad(
        make_backward(getattr(torch.ops.fastpeft, name + "_backward").default)
    )

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            # Straight to the CPU / CUDA kernel: the op's registered Autograd kernel would
            # only redispatch below autograd again, in Python.
            with torch._C._AutoDispatchBelowAutograd():
                output = forward_op(*inputs)
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"Eager_{name}"
    return Eager.apply


def register_loss_with_saved_grad(name: str, fake_forward) -> Callable:
    """register() for a loss op whose forward returns (loss, stats, grad): grad is d(loss) /
    d(first input), computed in the forward pass, and the backward op scales it by grad_loss.
    Only the first input gets a gradient; stats and grad are non-differentiable."""
    n_inputs = len(getattr(torch.ops.fastpeft, name).default._schema.arguments)

    def fake_backward(grad_loss, grad):
        return grad.new_empty(grad.shape)

    def setup_context(ctx, inputs, output):
        _, stats, grad = output
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats, grad)

    def make_backward(backward_op):
        def backward(ctx, grad_loss, grad_stats, grad_grad):
            (grad,) = ctx.saved_tensors
            g = backward_op(grad_loss, grad) if ctx.needs_input_grad[0] else None
            return (g,) + (None,) * (n_inputs - 1)

        return backward

    return register(name, fake_forward, fake_backward, setup_context, make_backward, triton=False)
