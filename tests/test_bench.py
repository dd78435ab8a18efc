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


def test_quick_e2e_benchmark_writes_results(tmp_path, monkeypatch):
    """bench_e2e --quick (tiny Llama, in-process timing only): SFT vs peft, DPO vs TRL, PPO vs
    the plain loop each time both sides on the same tokens and write the table and chart."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("bench_e2e")
    assert module.main(["--quick", "--rounds", "1", "--no-memory", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e_cpu_quick.json").read_text())
    rows = {row["task"]: row for row in data["rows"]}
    assert set(rows) == {"sft", "dpo", "ppo"}
    for task, baseline in (("sft", "peft"), ("dpo", "trl"), ("ppo", "plain")):
        row = rows[task]
        assert row["sides"] == ["fastpeft", baseline]
        res = row["results"]
        for name in row["sides"]:
            assert res[name]["median_s"] > 0 and res[name]["tokens_per_s"] > 0, (task, name)
        # the same batch on both sides
        assert res["fastpeft"]["tokens_per_step"] == res[baseline]["tokens_per_step"], task
        assert math.isfinite(row[f"speedup_fastpeft_over_{baseline}"])
    assert rows["sft"]["results"]["fastpeft"]["tokens_per_step"] == 2 * 32
    for name in ("fastpeft", "peft"):
        ops = rows["sft"]["profile_top_ops"][name]
        assert ops and all(o["self_ms"] >= 0 for o in ops)
    md = (tmp_path / "e2e_cpu_quick.md").read_text()
    for cells in ("| SFT | peft |", "| DPO | trl |", "| PPO | plain |", "SFT targets:"):
        assert cells in md, cells
    assert (tmp_path / "e2e_cpu_quick.png").read_bytes()[:4] == b"\x89PNG"
    sys.modules.pop("bench_e2e", None)


def test_e2e_memory_child_reports_peaks(monkeypatch):
    """The per-side memory process (bench_e2e --child): RSS high-water marks and the torch
    allocator's peak of one SFT step of the tiny model."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("bench_e2e")
    args = argparse.Namespace(device="cpu", model="smollm2", quick=True)
    mem = module.measure_memory("sft", "peft", args)
    assert mem["torch_peak_mb"] > 0 and mem["rss_max_mb"] > 100, mem
    assert mem["rss_step_mb"] is None or mem["rss_step_mb"] >= 0, mem
    sys.modules.pop("bench_e2e", None)


def test_cli_bench_suites(monkeypatch):
    """fastpeft bench --suite e2e runs bench_e2e.py, --suite all every suite; --op belongs to
    the ops suite."""
    from fastpeft import cli

    ran = []
    monkeypatch.setattr(cli, "_run_bench", lambda script, extra: ran.append((script, extra)) or 0)
    assert cli.main(["bench", "--suite", "e2e", "--quick"]) == 0
    assert ran == [("bench_e2e.py", ["--quick", "--device", "cpu"])]
    ran.clear()
    assert cli.main(["bench", "--suite", "all"]) == 0
    assert [s for s, _ in ran] == list(cli.OP_BENCHMARKS + cli.MODEL_BENCHMARKS) + [
        "bench_e2e.py", "bench_methods.py"]
    ran.clear()
    assert cli.main(["bench"]) == 0
    assert "bench_e2e.py" not in [s for s, _ in ran]
    ran.clear()
    assert cli.main(["bench", "--suite", "e2e", "--op", "gae"]) == 2 and not ran


def test_quick_methods_benchmark_writes_results(tmp_path, monkeypatch):
    """`fastpeft bench --suite methods --quick` runs bench_methods.py with arguments it takes;
    every method trains, evaluates and is measured (tiny random Llama, 2 steps) and the table
    and chart are written."""
    from fastpeft import cli

    ran = []
    monkeypatch.setattr(cli, "_run_bench", lambda script, extra: ran.append((script, extra)) or 0)
    assert cli.main(["bench", "--suite", "methods", "--quick"]) == 0
    ((script, extra),) = ran
    assert script == "bench_methods.py"
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("bench_methods")
    assert module.main(extra + ["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "methods_cpu_quick.json").read_text())
    assert data["meta"]["quick"] and data["meta"]["steps"] == 2 and data["meta"]["complete"]
    rows = {row["method"]: row for row in data["rows"]}
    assert list(rows) == ["zero-shot", *module.METHODS]
    assert 0.0 <= rows["zero-shot"]["accuracy"] <= 1.0
    for method in module.METHODS:
        row = rows[method]
        assert row["error"] is None, (method, row["error"])
        assert row["lr"] == module.LR[method] and row["steps"] == 2
        assert 0.0 <= row["accuracy"] <= 1.0 and len(row["step_s_runs"]) == 2, method
        assert row["step_s"] > 0 and row["train_s"] > 0 and row["eval_s"] > 0, method
        assert row["torch_peak_mb"] > 0 and math.isfinite(row["final_loss"]), method
        assert row["rss_step_mb"] is None or row["rss_step_mb"] >= 0, method
        if method == "full":
            assert row["trainable"] == row["total"]
        else:
            assert 0 < row["trainable"] < row["total"] // 10, (method, row["trainable"])
    # the method's own parameters: rsLoRA only rescales LoRA, DoRA adds magnitudes, the
    # Pfeiffer adapter is half the Houlsby one (one adapter per block instead of two)
    assert rows["rslora"]["trainable"] == rows["lora"]["trainable"] < rows["dora"]["trainable"]
    assert 2 * rows["pfeiffer"]["trainable"] == rows["houlsby"]["trainable"]
    # full fine-tuning holds gradients and AdamW state for every weight
    assert rows["full"]["torch_peak_mb"] > 2 * rows["lora"]["torch_peak_mb"]
    md = (tmp_path / "methods_cpu_quick.md").read_text()
    for label in ["zero-shot (base model)", *module.LABELS.values()]:
        assert f"| {label} |" in md, label
    assert (tmp_path / "methods_cpu_quick.png").read_bytes()[:4] == b"\x89PNG"
    # --report-only writes the same table from the json
    (tmp_path / "methods_cpu_quick.md").unlink()
    assert module.main(["--quick", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "methods_cpu_quick.md").read_text() == md
    # --merge re-runs one method and keeps the others' rows, and the note says so
    assert module.main(["--quick", "--methods", "ia3", "--merge", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "methods_cpu_quick.json").read_text())
    again = {row["method"]: row for row in merged["rows"]}
    assert list(again) == ["zero-shot", *module.METHODS] and merged["meta"]["complete"]
    assert again["lora"] == rows["lora"] and again["ia3"] != rows["ia3"]
    assert "Merged: ia3 re-run" in (tmp_path / "methods_cpu_quick.md").read_text()
    sys.modules.pop("bench_methods", None)


def test_methods_benchmark_options(capsys, monkeypatch, tmp_path):
    """An unknown method is an error naming it; --device cuda (from `fastpeft bench --device
    cuda --suite all`) runs nothing and says so."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("bench_methods")
    with pytest.raises(SystemExit):
        module.main(["--quick", "--methods", "lora,qlora"])
    assert "--methods: 'qlora' is not one of" in capsys.readouterr().err
    assert module.main(["--quick", "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert "CPU only" in capsys.readouterr().err and not list(tmp_path.iterdir())
    sys.modules.pop("bench_methods", None)
