import os
import shutil

import pytest
import torch

import fastpeft
from fastpeft import _ext


def test_extension_loads_and_reports_its_build():
    info = fastpeft.build_info()
    assert info["extension"], info.get("error")
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda_archs"], list)


def test_cuda_kernels_compiled_wherever_nvcc_is_present():
    if os.environ.get("FASTPEFT_CUDA") == "0":
        assert not fastpeft.build_info()["cuda_kernels"]
        return
    info = fastpeft.build_info()
    if shutil.which("nvcc") and torch.version.cuda:
        assert info["cuda_kernels"], "nvcc is present but the CUDA kernels were not compiled"
        wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(";", " ").split()
        assert info["cuda_archs"] == wanted
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fastpeft::lora_linear", "CUDA")
    else:
        assert not info["cuda_kernels"]


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", ImportError("no _C"))
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="make setup"):
        fastpeft.ops.lora_linear(x, torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
    assert "make setup" in fastpeft.build_info()["error"]


def test_backend_selection_and_context_manager():
    ops = fastpeft.ops
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fast'"):
        ops.set_backend("fast")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4)
    with fastpeft.ops.use_backend("triton"):
        with pytest.raises(ValueError, match="triton backend needs CUDA tensors"):
            fastpeft.ops.lora_linear(x, torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)


def test_cpp_backend_selects_the_cpp_kernels():
    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with fastpeft.ops.use_backend("cpp"):
        assert fastpeft.ops.get_backend() == "cpp"
        y = fastpeft.ops.lora_linear(x, w, None, a, b, 2.0)
    torch.testing.assert_close(y, fastpeft.ops.reference.lora_linear(x, w, None, a, b, 2.0))
    assert fastpeft.ops._backend.implementation("prefix_attention", torch.device("cuda")) == "triton"
    with fastpeft.ops.use_backend("cpp"):
        assert fastpeft.ops._backend.implementation("prefix_attention", torch.device("cuda")) == "cpp"
