"""Shared test plumbing: run an op with its gradients, compare against the fp64 reference, and
list what autograd saves for the backward."""

import torch

from _tolerance import assert_close_to_reference


def run(fn, tensors, rest, grad_out):
    """fn(*tensors, *rest) and the grads of the tensors that require grad (fresh leaves)."""
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
               for t in tensors]
    y = fn(*tensors, *rest)
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    if y.numel():
        grads = torch.autograd.grad(y, leaves, grad_out)
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    return y.detach(), [g.detach() for g in grads]


def compare_with_reference(kernel, reference, tensors, rest, grad_out64, dtype):
    """The kernel in dtype vs the fp64 reference vs the reference in dtype (FlashAttention's
    2x rule), output and every gradient."""
    out = run(kernel, tensors, rest, grad_out64.to(dtype))
    ref64 = run(reference, [t.double() if t is not None and t.is_floating_point() else t
                            for t in tensors], rest, grad_out64)
    plain = run(reference, tensors, rest, grad_out64.to(dtype))
    assert out[0].dtype == dtype and out[0].shape == ref64[0].shape
    assert torch.isfinite(out[0]).all()
    assert_close_to_reference(out[0], ref64[0], plain[0], "out")
    assert len(out[1]) == len(ref64[1])
    for i, (go, gr, gp) in enumerate(zip(out[1], ref64[1], plain[1])):
        assert go.shape == gr.shape, (i, go.shape, gr.shape)
        assert_close_to_reference(go, gr, gp, f"grad {i}")
    return out


def saved_tensors(fn, *args):
    """(shape, storage nbytes) of every tensor autograd saves while running fn(*args)."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.untyped_storage().nbytes(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved


def run_under_triton_interpret(test_module: str, body: str) -> None:
    """Run `body` in a fresh Python with TRITON_INTERPRET=1 set before triton is imported
    (Triton's own interpreter mode), with the test module imported as T and
    InterpretedFunction in scope; it must print OK."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = "\n".join([
        "import sys, torch",
        f"sys.path.insert(0, {str(tests)!r})",
        f"import {test_module} as T",
        "from triton.runtime.interpreter import InterpretedFunction",
        textwrap.dedent(body),
        "print('OK')",
    ])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tests.parent / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
