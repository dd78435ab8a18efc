"""Atomic checkpoints: everything is written into a temporary directory inside output_dir,
a marker file (COMPLETE) last, then the directory is renamed to checkpoint-<step>. Resume only
ever considers directories that carry the marker, so a half-written checkpoint (a crash before
the rename, or a directory someone copied in part) is never picked up."""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

MARKER = "COMPLETE"
STATE_NAME = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(output_dir: str, step: int, state: dict, extra=None) -> str:
    """Write `state` (torch.save-able) as checkpoint-<step>; `extra(tmp_dir)` may add files
    (e.g. the adapter in peft format). Returns the final directory."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    path = os.path.join(tmp, STATE_NAME)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if extra is not None:
        extra(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # a re-run of the same step: move the old one out of the way
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    return final


def list_checkpoints(output_dir: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """(step, directory) of the checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if not m or not os.path.isdir(path):
            continue
        if complete_only and not is_complete(path):
            continue
        found.append((int(m.group(1)), path))
    return sorted(found)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(
        os.path.join(path, STATE_NAME))


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str, keep_last: int | None) -> list[str]:
    """Delete all but the newest keep_last complete checkpoints, and leftover temporary
    directories of this process's earlier saves. Returns the removed directories."""
    removed = []
    if keep_last is None:
        return removed
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - keep_last, 0)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_leftovers(output_dir: str) -> list[str]:
    """Delete temporary directories that an interrupted save left in output_dir (one writer
    per output_dir is assumed). Returns them."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and (name.startswith(".tmp-checkpoint-")
                                    or re.match(r"^checkpoint-\d+\.old-\d+$", name)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def read_checkpoint(path: str, map_location="cpu") -> dict:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker or "
                                f"no {STATE_NAME})")
    return torch.load(os.path.join(path, STATE_NAME), map_location=map_location,
                      weights_only=False)
