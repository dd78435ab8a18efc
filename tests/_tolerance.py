"""Per-dtype tolerances, FlashAttention's rule: a kernel's error against an fp64 reference may be
at most 2x the error of plain PyTorch in the same precision (plus a small floor)."""

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close_to_reference(out, ref64, plain, name=""):
    """out: kernel result; ref64: fp64 reference; plain: PyTorch in out's dtype."""
    out64, plain64 = out.double(), plain.double()
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    floor = ATOL[out.dtype] * max(scale, 1.0)
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    plain_err = (plain64 - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * plain_err + floor, (
        f"{name}: max error {err:.3g} vs plain PyTorch {plain_err:.3g} (floor {floor:.3g})"
    )
