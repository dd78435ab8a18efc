"""Training logs: output_dir/metrics.jsonl (one JSON object per logged step, with "step"),
TensorBoard events (output_dir/tensorboard/), and PNG plots of every curve at the end
(output_dir/plots/<metric>.png, drawn from metrics.jsonl so a resumed run plots its whole
history)."""

from __future__ import annotations

import json
import math
import os

METRICS_NAME = "metrics.jsonl"


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    return value


class MetricsLogger:
    def __init__(self, output_dir: str, tensorboard: bool = True):
        self.output_dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, METRICS_NAME)
        self._tensorboard = tensorboard
        self._writer = None

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (what a killed run logged past the
        checkpoint it is resumed from)."""
        if not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> dict:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self.writer()
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, v, step)
        return record

    def writer(self):
        if self._tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.output_dir, "tensorboard"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


class NullLogger(MetricsLogger):
    """The logger of ranks other than 0 in a distributed run: it writes nothing."""

    def __init__(self, output_dir: str, tensorboard: bool = False):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, METRICS_NAME)
        self._tensorboard = False
        self._writer = None

    def truncate_after(self, step: int) -> None:
        pass

    def log(self, step: int, metrics: dict) -> dict:
        return {"step": step, **{k: _clean(v) for k, v in metrics.items()}}


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(output_dir: str) -> list[str]:
    """One PNG per numeric metric of metrics.jsonl in output_dir/plots/. Returns the paths."""
    path = os.path.join(output_dir, METRICS_NAME)
    if not os.path.exists(path):
        return []
    records = read_metrics(path)
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(r["step"])
            ys.append(v)
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = os.path.join(output_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (xs, ys) in series.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        file = os.path.join(out_dir, name.replace("/", "_") + ".png")
        fig.savefig(file, dpi=80)
        plt.close(fig)
        written.append(file)
    return written
