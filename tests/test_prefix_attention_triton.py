"""Triton kernels of prefix_attention (python/fastpeft/ops/triton/prefix_attention.py) against
the fp64 reference (fastpeft.ops.reference.prefix_attention), forward, lse and all five grads.

On the CPU the kernels run in-process under the Triton interpreter whatever TRITON_INTERPRET
was: CPU launches go through lora_linear._launch_kernel (see tests/test_lora_linear_triton.py,
which also checks that this leaves triton.language unpatched); the interpreter uses 16-wide
blocks, so T = 37 spans three query and key blocks. Triton's own mode (TRITON_INTERPRET=1
before triton is imported) runs in a subprocess. Tolerances: tests/_tolerance.py (at most 2x
the error of plain PyTorch in the same dtype, plus a floor). Without a GPU the compiled path
is checked by compiling every kernel for sm_90 (no register spills, shared memory fits);
the CUDA tests skip.
"""

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import triton

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import reference
from fastpeft.ops.triton import prefix_attention as tpa
from _harness import run_under_triton_interpret
from _tolerance import assert_close_to_reference

GRAD_NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


# ------------------------------------------------------------------------------------------
# Inputs and the fp64 ground truth
# ------------------------------------------------------------------------------------------


def make_inputs(B, Hq, Hkv, T, P, D, Bp, mask, dtype, device="cpu", seed=0):
    """q, k, v, prefix_k, prefix_v, attn_mask, grad_out. mask: None, or "pad": random key
    padding where batch row 0 hides its first key (with P = 0 and causal, query 0 sees
    nothing) and row 1 hides every key (it sees only the prefix, or nothing when P = 0)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    pk, pv = rnd(Bp, Hkv, P, D), rnd(Bp, Hkv, P, D)
    attn_mask = None
    if mask == "pad":
        attn_mask = torch.rand(B, T, generator=g) < 0.7
        if B > 0 and T > 0:
            attn_mask[0, 0] = False
        if B > 1:
            attn_mask[1] = False
        attn_mask = attn_mask.to(device)
    return q, k, v, pk, pv, attn_mask, rnd(B, Hq, T, D)


def reference_lse(q, k, pk, attn_mask, causal, scale):
    """fp64 log sum exp over the visible keys, +inf where none is visible."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    P = pk.shape[2]
    keys = torch.cat([pk.double().expand(B, -1, -1, -1), k.double()], 2)
    keys = keys.repeat_interleave(group, 1)
    scores = q.double() @ keys.transpose(-1, -2) * scale
    visible = torch.ones(B, 1, T, P + T, dtype=torch.bool, device=q.device)
    if causal:
        visible[..., P:] &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        visible[..., P:] &= attn_mask[:, None, None, :]
    lse = scores.masked_fill(~visible, -math.inf).logsumexp(-1)
    return torch.where(visible.any(-1), lse, math.inf)


def reference_run(inputs, causal, scale, dtype):
    """(out, grads) of reference.prefix_attention computed in `dtype` with autograd."""
    q, k, v, pk, pv, attn_mask, go = inputs
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, pk, pv)]
    out = reference.prefix_attention(*leaves, attn_mask, causal, scale)
    grads = torch.autograd.grad(out, leaves, go.to(dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out.detach(), grads


def check_against_reference(inputs, causal, scale, out, lse, grads):
    """out, lse and the five grads against fp64, tolerance from plain PyTorch in out's dtype."""
    dtype = out.dtype
    q, k, v, pk, pv, attn_mask, _ = inputs
    out64, grads64 = reference_run(inputs, causal, scale, torch.float64)
    out_plain, grads_plain = reference_run(inputs, causal, scale, dtype)
    assert out.shape == q.shape
    assert_close_to_reference(out, out64, out_plain, "out")

    lse64 = reference_lse(q, k, pk, attn_mask, causal, scale)
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    none_visible = torch.isinf(lse64)
    assert torch.equal(torch.isposinf(lse), none_visible), "lse must be +inf exactly where no key"
    assert not out[none_visible].any(), "a query that sees no key must output 0"
    finite = ~none_visible
    if finite.any():
        err = (lse.double()[finite] - lse64[finite]).abs().max().item()
        # the scores of 16-bit inputs are exact products summed in fp32: same tolerance
        assert err <= 2e-4 * max(1.0, lse64[finite].abs().max().item()), f"lse error {err}"

    for name, got, want, plain, like in zip(GRAD_NAMES, grads, grads64, grads_plain,
                                            (q, k, v, pk, pv)):
        assert got.shape == like.shape and got.dtype == dtype, (name, got.shape, got.dtype)
        assert_close_to_reference(got, want, plain, name)


def run_triton(inputs, causal, scale):
    q, k, v, pk, pv, attn_mask, go = inputs
    out, lse = tpa.prefix_attention_triton_impl(q, k, v, pk, pv, attn_mask, causal, scale)
    grads = tpa.prefix_attention_triton_backward_impl(go, q, k, v, pk, pv, attn_mask, out, lse,
                                                      causal, scale)
    return out, lse, grads


# ------------------------------------------------------------------------------------------
# Interpreter (CPU): forward, lse and grads against the fp64 reference
# ------------------------------------------------------------------------------------------

F32, BF16 = torch.float32, torch.bfloat16
# id: (B, Hq, Hkv, T, P, D, Bp, causal, mask, dtype)
CASES = {
    "causal_shared_prefix": (2, 2, 2, 37, 5, 24, 1, True, None, F32),
    "full_mask_gqa_batch_prefix": (2, 6, 2, 37, 5, 24, 2, False, "pad", F32),
    "causal_mask_gqa_d80": (3, 6, 2, 21, 5, 80, 1, True, "pad", F32),
    "t1_p1": (2, 2, 1, 1, 1, 16, 2, True, "pad", F32),
    "t1_p1_shared": (3, 3, 3, 1, 1, 8, 1, False, None, F32),
    "no_prefix_rows_see_nothing": (2, 2, 1, 9, 0, 24, 1, True, "pad", F32),
    "no_prefix_full": (2, 2, 2, 17, 0, 24, 2, False, "pad", F32),
    "long_prefix_short_seq": (1, 2, 1, 3, 37, 24, 1, True, None, F32),
    "bf16_causal_mask_gqa": (2, 6, 2, 37, 5, 24, 1, True, "pad", BF16),
    "bf16_full_d80": (2, 2, 2, 19, 3, 80, 2, False, None, BF16),
    "fp16_causal": (2, 2, 1, 18, 3, 24, 1, True, "pad", torch.float16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_against_reference(case):
    B, Hq, Hkv, T, P, D, Bp, causal, mask, dtype = CASES[case]
    inputs = make_inputs(B, Hq, Hkv, T, P, D, Bp, mask, dtype)
    scale = 0.7 * D**-0.5
    out, lse, grads = run_triton(inputs, causal, scale)
    check_against_reference(inputs, causal, scale, out, lse, grads)


def test_shared_prefix_split_partials(monkeypatch):
    """Bp = 1 with the batch split over several programs (fp32 partials summed on the host), as
    on a GPU: 5 rows, 2 per program, 3 partials."""
    monkeypatch.setattr(tpa, "_shared_prefix_rows_per_split", lambda B, programs, device: 2)
    for dtype in (F32, BF16):
        inputs = make_inputs(5, 4, 2, 11, 7, 24, 1, "pad", dtype, seed=3)
        out, lse, grads = run_triton(inputs, True, 0.3)
        check_against_reference(inputs, True, 0.3, out, lse, grads)


def test_empty_shapes_launch_nothing(monkeypatch):
    """B = 0 and T = 0 return empties (prefix grads zero) without launching a kernel."""

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(tpa, "_launch_kernel", no_launch)
    for B, T, Bp in ((0, 5, 1), (0, 5, 0), (2, 0, 1), (2, 0, 2)):
        q, k, v, pk, pv, _, go = make_inputs(B, 4, 2, T, 3, 16, Bp, None, F32)
        out, lse = tpa.prefix_attention_triton_impl(q, k, v, pk, pv, None, True, 0.25)
        assert out.shape == (B, 4, T, 16) and lse.shape == (B, 4, T)
        assert lse.dtype == torch.float32
        grads = tpa.prefix_attention_triton_backward_impl(go, q, k, v, pk, pv, None, out, lse,
                                                          True, 0.25)
        for g, like in zip(grads, (q, k, v, pk, pv)):
            assert g.shape == like.shape and g.dtype == F32 and not g.any()


def test_zero_head_dim():
    """D = 0: every score is 0, so lse = log(number of visible keys); nothing is launched."""
    q, k, v, pk, pv, mask, go = make_inputs(2, 2, 1, 6, 2, 0, 1, "pad", F32)
    out, lse = tpa.prefix_attention_triton_impl(q, k, v, pk, pv, mask, True, 1.0)
    assert out.shape == (2, 2, 6, 0)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, pk, mask, True, 1.0))


def test_rejects_bad_inputs():
    q, k, v, pk, pv, mask, go = make_inputs(2, 4, 2, 5, 3, 16, 1, "pad", F32)
    impl = tpa.prefix_attention_triton_impl
    with pytest.raises(RuntimeError, match="prefix_k must be"):
        impl(q, k, v, pk.expand(3, -1, -1, -1), pv.expand(3, -1, -1, -1), mask, True, 1.0)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        impl(q[:, :3], k, v, pk, pv, mask, True, 1.0)
    with pytest.raises(RuntimeError, match="v dtype"):
        impl(q, k, v.to(BF16), pk, pv, mask, True, 1.0)
    with pytest.raises(RuntimeError, match="q dtype"):
        impl(q.double(), k.double(), v.double(), pk.double(), pv.double(), mask, True, 1.0)
    with pytest.raises(RuntimeError, match="attn_mask must be a bool"):
        impl(q, k, v, pk, pv, mask.float(), True, 1.0)
    with pytest.raises(RuntimeError, match=r"attn_mask must be \[2, 5\]"):
        impl(q, k, v, pk, pv, mask[:, :4], True, 1.0)
    out, lse = impl(q, k, v, pk, pv, mask, True, 1.0)
    bwd = tpa.prefix_attention_triton_backward_impl
    with pytest.raises(RuntimeError, match="lse must be"):
        bwd(go, q, k, v, pk, pv, mask, out, lse.double(), True, 1.0)
    with pytest.raises(RuntimeError, match="grad_out must have"):
        bwd(go[:, :, :4], q, k, v, pk, pv, mask, out, lse, True, 1.0)


# ------------------------------------------------------------------------------------------
# Through the registered ops and the public wrapper
# ------------------------------------------------------------------------------------------


def test_registered_ops_match_host_functions():
    tpa.register()
    tpa.register()  # idempotent
    inputs = make_inputs(2, 4, 2, 9, 3, 16, 1, "pad", F32)
    q, k, v, pk, pv, mask, go = inputs
    out, lse = torch.ops.fastpeft.prefix_attention_triton(q, k, v, pk, pv, mask, True, 0.3)
    grads = torch.ops.fastpeft.prefix_attention_triton_backward(go, q, k, v, pk, pv, mask, out,
                                                                lse, True, 0.3)
    check_against_reference(inputs, True, 0.3, out, lse, grads)


def test_public_wrapper_triton_backend(monkeypatch):
    """fastpeft.ops.prefix_attention with use_backend("triton") (on the CPU the dispatcher asks
    for TRITON_INTERPRET=1) runs these kernels, autograd included."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs(2, 6, 2, 13, 4, 24, 1, "pad", F32, seed=5)
    q, k, v, pk, pv, mask, go = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    with fastpeft.ops.use_backend("triton"):
        out = fastpeft.ops.prefix_attention(*leaves, attn_mask=mask, causal=True, scale=0.3)
    out.backward(go)
    _, lse = tpa.prefix_attention_triton_impl(q, k, v, pk, pv, mask, True, 0.3)
    check_against_reference(inputs, True, 0.3, out.detach(), lse, [t.grad for t in leaves])


def test_opcheck():
    """Schema, fake kernels and autograd registration (fastpeft.ops.prefix_attention) agree
    with the Triton kernels."""
    tpa.register()
    q, k, v, pk, pv, mask, go = make_inputs(2, 4, 2, 5, 3, 16, 1, "pad", F32)
    args = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_triton.default,
                          (*args, mask, True, 0.3))
    with torch.no_grad():
        out, lse = torch.ops.fastpeft.prefix_attention_triton(q, k, v, pk, pv, mask, False, 0.3)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_triton_backward.default,
                          (go, *(t.detach() for t in args), mask, out, lse, False, 0.3))


def test_interpreter_leaves_triton_unpatched():
    """The kernels call @triton.jit device functions; interpreting them in-process must restore
    triton.language and JITFunction.__call__ (later CUDA compilation depends on them)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tpa._fwd_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1: triton's own interpreter mode, nothing compiles")

    def snapshot():
        return {(id(mod), k): v for mod in (tl, tl.core, tl.math, tl.standard)
                for k, v in vars(mod).items()} | {("tensor", k): v for k, v in
                                                  vars(tl.tensor).items()}

    before = snapshot()
    call = JITFunction.__dict__["__call__"]
    run_triton(make_inputs(1, 2, 1, 5, 2, 16, 1, "pad", F32), True, 0.3)
    after = snapshot()
    changed = [k for k in before if k[1] != "__builtins__" and before[k] is not after.get(k)]
    assert not changed, changed[:10]
    assert JITFunction.__dict__["__call__"] is call


def test_triton_interpret_env_subprocess():
    """Triton's own interpreter mode: TRITON_INTERPRET=1 before triton is imported."""
    run_under_triton_interpret("test_prefix_attention_triton", """
    assert isinstance(T.tpa._fwd_kernel, InterpretedFunction)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = T.make_inputs(2, 4, 2, 19, 3, 24, 1, "pad", dtype)
        out, lse, grads = T.run_triton(inputs, True, 0.3)
        T.check_against_reference(inputs, True, 0.3, out, lse, grads)
    """)


# ------------------------------------------------------------------------------------------
# The compiled (CUDA) path without a GPU: every kernel compiles for sm_90
# ------------------------------------------------------------------------------------------


def _signatures(dt):
    i, f, f32p = "i32", "fp32", "*fp32"
    qkv = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt)
    return {
        "fwd": (tpa._fwd_kernel, dict(
            **qkv, pk_ptr=dt, pv_ptr=dt, mask_ptr="*u8", out_ptr=dt, lse_ptr=f32p, Hq=i,
            Hkv=i, T=i, P=i, D=i, prefix_bstride=i, qk_scale=f), ("HAS_MASK", "CAUSAL")),
        "dkdv": (tpa._bwd_dkdv_seq_kernel, dict(
            **qkv, do_ptr=dt, lse_ptr=f32p, delta_ptr=f32p, mask_ptr="*u8", dk_ptr=dt,
            dv_ptr=dt, Hq=i, Hkv=i, T=i, D=i, qk_scale=f, scale=f), ("HAS_MASK", "CAUSAL")),
        "dkdv_prefix": (tpa._bwd_dkdv_prefix_kernel, dict(
            q_ptr=dt, pk_ptr=dt, pv_ptr=dt, do_ptr=dt, lse_ptr=f32p, delta_ptr=f32p,
            dk_ptr=f32p, dv_ptr=f32p, B=i, Hq=i, Hkv=i, T=i, P=i, D=i, prefix_bstride=i,
            ROWS_PER_SPLIT=i, qk_scale=f, scale=f), ()),
        "dq": (tpa._bwd_dq_kernel, dict(
            **qkv, pk_ptr=dt, pv_ptr=dt, mask_ptr="*u8", do_ptr=dt, lse_ptr=f32p,
            delta_ptr=f32p, dq_ptr=dt, Hq=i, Hkv=i, T=i, P=i, D=i, prefix_bstride=i,
            qk_scale=f, scale=f), ("HAS_MASK", "CAUSAL")),
    }


@pytest.mark.parametrize("arch,dtype,D,flags_on", [
    (90, BF16, 128, True), (90, torch.float16, 64, False), (90, F32, 80, True),
    (80, BF16, 96, True), (80, F32, 64, False)])
def test_kernels_compile_for_cuda(arch, dtype, D, flags_on):
    """Compiles the kernels with the tile sizes picked for CUDA to cubins for sm_90 / sm_80
    with triton's bundled ptxas (no GPU needed): catches typing errors the interpreter lets
    through, shared memory over the A100 limit and register spills (cuobjdump).
    flags_on: HAS_MASK and CAUSAL both on, or both off."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tpa._fwd_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted")
    dt = {BF16: "*bf16", torch.float16: "*fp16", F32: "*fp32"}[dtype]
    block_d = tpa._block_d(D)
    cfgs = tpa._compiled_configs(arch // 10, dtype, block_d)
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    target = GPUTarget("cuda", arch, 32)
    for name, (kernel, signature, flags) in _signatures(dt).items():
        cfg = dict(cfgs["dkdv" if name == "dkdv_prefix" else name])
        options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        constexprs = dict(cfg, UPCAST=False, BLOCK_D=block_d,
                          DOT_PRECISION="ieee" if dtype == F32 else "tf32",
                          **{flag: flags_on for flag in flags})
        signature = {**signature, **{key: "constexpr" for key in constexprs}}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options=options)
        assert compiled.metadata.shared <= 163 * 1024, (name, compiled.metadata.shared)
        if dtype != F32 and arch == 90:
            assert "wgmma" in compiled.asm["ptx"], f"{name}: no tensor-core MMA"
        if cuobjdump.exists():
            cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastpeft_pa_{os.getpid()}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                                   capture_output=True, text=True).stdout
            cubin.unlink()
            stack = re.search(r"STACK:(\d+)", usage)
            assert stack and stack.group(1) == "0", f"{name} spills registers: {usage}"
    constexprs = dict(BLOCK_M=tpa._delta_rows(block_d), BLOCK_D=block_d)
    signature = dict(out_ptr=dt, do_ptr=dt, delta_ptr="*fp32", ROWS="i32", D="i32",
                     **{key: "constexpr" for key in constexprs})
    triton.compile(ASTSource(tpa._bwd_delta_kernel, signature, constexprs), target=target,
                   options=dict(num_warps=4, num_stages=1))


# ------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels against the fp64 reference
# ------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, BF16, F32])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("causal,Bp", [(True, 1), (False, 3)])
def test_cuda_against_reference(D, dtype, causal, Bp):
    tpa.register()
    inputs = make_inputs(3, 4, 2, 300, 17, D, Bp, "pad", dtype, device="cuda")
    q, k, v, pk, pv, mask, go = inputs
    scale = D**-0.5
    out, lse = torch.ops.fastpeft.prefix_attention_triton(q, k, v, pk, pv, mask, causal, scale)
    grads = torch.ops.fastpeft.prefix_attention_triton_backward(go, q, k, v, pk, pv, mask, out,
                                                                lse, causal, scale)
    check_against_reference(inputs, causal, scale, out, lse, grads)


@needs_gpu
def test_cuda_long_sequence_bf16():
    """T = 2048, P = 64, D = 128, bf16, GQA, causal with padding: forward and backward."""
    tpa.register()
    inputs = make_inputs(2, 8, 2, 2048, 64, 128, 1, "pad", BF16, device="cuda")
    q, k, v, pk, pv, mask, go = inputs
    out, lse = torch.ops.fastpeft.prefix_attention_triton(q, k, v, pk, pv, mask, True, 128**-0.5)
    grads = torch.ops.fastpeft.prefix_attention_triton_backward(go, q, k, v, pk, pv, mask, out,
                                                                lse, True, 128**-0.5)
    check_against_reference(inputs, True, 128**-0.5, out, lse, grads)


@needs_gpu
def test_cuda_opcheck():
    tpa.register()
    q, k, v, pk, pv, mask, go = make_inputs(2, 4, 2, 70, 5, 64, 1, "pad", BF16, device="cuda")
    args = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_triton.default,
                          (*args, mask, True, 0.125))
    with torch.no_grad():
        out, lse = torch.ops.fastpeft.prefix_attention_triton(q, k, v, pk, pv, mask, True, 0.125)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_triton_backward.default,
                          (go, *(t.detach() for t in args), mask, out, lse, True, 0.125))
