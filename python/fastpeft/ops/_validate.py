"""ValueError checks for the Python wrappers: each names the argument, the expected and the actual."""

import torch


def check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_like(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like {x_name}, got {t.device}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have dtype {x.dtype} like {x_name}, got {t.dtype}")


def check_float_dtype(x: torch.Tensor, name: str = "x") -> None:
    allowed = (
        (torch.float32, torch.bfloat16, torch.float16)
        if x.device.type == "cuda"
        else (torch.float32, torch.bfloat16, torch.float64)
    )
    if x.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must have dtype one of {names} on {x.device.type}, got {x.dtype}")


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in_features], got shape {tuple(x.shape)}")
    check_float_dtype(x)
    check_tensor("weight", weight, 2)
    check_like("weight", weight, x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be [out_features, {x.shape[-1]}] to match x's last dim, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_like("bias", bias, x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must be [{weight.shape[0]}] (out_features), got {tuple(bias.shape)}"
            )


def check_dropout(dropout_p: float) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
