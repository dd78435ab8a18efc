"""Process-group set-up for torchrun (one node or several) and the few collectives the trainers
need. Everything here is a no-op in a plain single-process run (WORLD_SIZE unset or 1), so the
stages call these helpers unconditionally.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (for several nodes, from
its rendezvous: `--nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=host:port`); `init_distributed`
initialises with env://, so one node and several nodes are the same code. The backend is gloo on
the CPU and NCCL on CUDA (each process on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {value!r}") from None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0,
                     force: bool = False) -> bool:
    """Join the process group torchrun describes in the environment (env://). Idempotent; does
    nothing when WORLD_SIZE is unset or 1 (unless `force`: FSDP needs a group even in one
    process). Backend: NCCL when CUDA is available (after torch.cuda.set_device(LOCAL_RANK)),
    gloo otherwise. Returns whether this is a several-process run."""
    if is_initialized():
        return dist.get_world_size() > 1
    if _env_world_size() <= 1 and not force:
        return False
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set; "
                               f"launch with torchrun (python -m torch.distributed.run)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the only process that writes logs, plots, checkpoints and the final model."""
    return rank() == 0


def is_distributed() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value):
    """The sum over ranks of a tensor (returned as a new tensor on the value's device) or of a
    Python number (returned as a float; computed in float64). Identity in one process."""
    if not is_distributed():
        return value if torch.is_tensor(value) else float(value)
    if torch.is_tensor(value):
        buf = value.detach().to(comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(value.device)
    buf = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return float(buf.item())


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s values into `tensors` on every rank, in one flat message per dtype."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(comm_device())
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t).to(t.device))
                offset += n


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if is_initialized():
        dist.destroy_process_group()


__all__ = ["all_gather_object", "all_reduce_sum", "barrier", "broadcast_", "cleanup",
           "init_distributed", "is_distributed", "is_initialized", "is_main", "local_rank",
           "rank", "world_size"]
