"""The op benchmarks run (quick mode, one round) and write their results: they must not rot."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
OPS = ["lora_linear", "ia3_linear", "adapter_bottleneck", "prefix_attention", "token_logprobs",
       "gae", "ppo_loss", "linear_cross_entropy"]


@pytest.mark.parametrize("op", OPS)
def test_quick_benchmark_writes_results(op, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(f"bench_{op}")
    assert module.main(["--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"{op}_cpu_quick.json").read_text())
    assert data["rows"] and data["meta"]["quick"]
    for row in data["rows"]:
        for name, res in row["results"].items():
            assert math.isfinite(res["median_ms"]) and res["median_ms"] > 0, (name, res)
            assert res["saved_mb"] >= 0
    assert (tmp_path / f"{op}_cpu_quick.md").read_text().count("|") > 10
    sys.modules.pop(f"bench_{op}", None)


def test_quick_patch_benchmark_writes_results(tmp_path, monkeypatch):
    """bench_patch --quick: fastpeft-patched vs peft on a tiny Llama: same logits, both ratios."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("bench_patch")
    assert module.main(["--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "patch_cpu_quick.json").read_text())["rows"]
    assert row["check_max_abs_diff"] < 1e-5
    for name in ("peft", "fastpeft"):
        res = row["results"][name]
        assert res["median_ms"] > 0 and res["peak_mb"] > 0 and res["saved_mb"] > 0, (name, res)
    for key in ("time_fastpeft_over_peft", "peak_fastpeft_over_peft", "saved_fastpeft_over_peft"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert "| tiny-llama | 2 x 32 |" in (tmp_path / "patch_cpu_quick.md").read_text()
    sys.modules.pop("bench_patch", None)
