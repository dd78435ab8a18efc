"""Loads the compiled extension fastpeft._C, which registers torch.ops.fastpeft.*."""

import torch  # noqa: F401  (loads libtorch before the extension)

BUILD_HINT = (
    "fastpeft's compiled extension fastpeft._C is not built or failed to load. "
    "Build it from the repository root with `make setup` "
    "(or `pip install --no-build-isolation -e .`)."
)

try:
    from fastpeft import _C
except ImportError as error:  # the package still imports; using an op says how to build
    _C = None
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None


def extension_loaded() -> bool:
    return _C is not None


def require_extension():
    """The loaded extension module, or a RuntimeError that says how to build it."""
    if _C is None:
        raise RuntimeError(f"{BUILD_HINT} (import error: {IMPORT_ERROR})")
    return _C


def build_info() -> dict:
    """How fastpeft was built: torch version, CUDA kernels and archs, whether Triton imports."""
    info: dict = {"extension": _C is not None, "torch_runtime": torch.__version__}
    if _C is None:
        info["error"] = f"{BUILD_HINT} (import error: {IMPORT_ERROR})"
        info["cuda_kernels"] = False
        info["cuda_archs"] = []
    else:
        info.update(_C.build_info())
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as error:  # noqa: BLE001  (any failure means Triton is unusable)
        info["triton"] = None
        info["triton_error"] = str(error)
    info["cuda_available"] = torch.cuda.is_available()
    return info
