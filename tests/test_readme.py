"""Every code block of README.md is run here, so none of them can rot.

- python blocks: executed one by one, each in a fresh namespace, in a temporary working
  directory that has the repository's examples/ (the blocks use repository-relative paths).
  `fastpeft.models.load_model` loads SmolLM2 for real once; later calls get a copy of it.
- bash blocks: every command is run, with the substitutions a 2-core CPU without a GPU needs:
  - `make demo`: run for real (set-up, then `fastpeft demo`) with `DEMO_ARGS="--quick --out
    TMP"`: the demo's whole path on a tiny random model, so nothing is written into the
    checkout and the suite stays within its time (the full demo on SmolLM2 takes minutes; its
    measured run is bench/results/demo_cpu.json); `make test` is this suite, so only its dry
    run (`make -n test`) is checked.
  - `pip install --no-build-isolation .`: as written plus `--no-deps --target TMP` (nothing
    is installed into the environment; CMake reuses the build/ of `make`, so nothing is
    recompiled); the `python -c` line after it imports that installed copy.
  - `fastpeft sft|rm|ppo|dpo ...`: the README's arguments plus `train.max_steps=1` and, unless
    the line names its model, `model=TINY`, a tiny random Llama with SmolLM2's tokenizer (the
    stages on SmolLM2 itself are the slow tests of test_cli.py and test_train_*.py);
    `fastpeft merge` and `fastpeft sample`: as written; `fastpeft rank`: a seeded random order
    per prompt is piped into it, as a person would type them.
  - `torchrun`: `--nproc_per_node` becomes 2 gloo processes; a multi-node line runs its
    nodes on this machine (node ranks 0 and 1, one process each, master 127.0.0.1 on a free
    port), with the same appended overrides.
  A command without a rule fails the test: a new kind of block needs a runner here.
- The README's generated tables equal what bench/readme_tables.py generates from
  bench/results/ now (no figure is typed by hand).
"""

import copy
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tokenizer import save_tiny_llama

import fastpeft.models
from fastpeft import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
STAGES = ("sft", "rm", "ppo", "dpo")


def readme_blocks(text: str | None = None) -> list[tuple[str, str, int]]:
    """(language, code, line number of the opening fence) of every fenced block."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def commands(code: str) -> list[tuple[dict, list[str]]]:
    """(leading VAR=value assignments, argv) of each command of a shell block: backslash
    continuations joined, comments dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        env = {}
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        if argv:
            out.append((env, argv))
    return out


BLOCKS = readme_blocks()
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]
SHELL = [(code, line) for lang, code, line in BLOCKS if lang in ("bash", "sh")]


def runner_of(argv: list[str]) -> str:
    """The rule that runs a README command (see the module docstring)."""
    if argv[0] == "make" and len(argv) == 2 and argv[1] in ("demo", "test"):
        return "make_" + argv[1]
    if argv[:2] == ["pip", "install"] and "--no-build-isolation" in argv:
        return "pip_install"
    if argv[0] == "python" and argv[1] == "-c":
        return "python_c"
    if argv[0] == "fastpeft" and len(argv) > 1 and argv[1] in (*STAGES, "merge", "sample"):
        return "fastpeft"
    if argv[:2] == ["fastpeft", "rank"]:
        return "rank"
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "fastpeft":
        return "torchrun"
    raise AssertionError(f"README command {shlex.join(argv)!r} has no runner in "
                         "tests/test_readme.py")


def test_every_block_is_python_or_shell_and_every_command_has_a_runner():
    assert PYTHON and SHELL
    for lang, code, line in BLOCKS:
        assert lang in ("python", "bash", "sh"), f"README.md:{line}: block language {lang!r}"
    kinds = {runner_of(argv) for code, _ in SHELL for _, argv in commands(code)}
    assert {"make_demo", "make_test", "pip_install", "fastpeft", "rank", "torchrun"} <= kinds


def test_the_readme_tables_are_generated_from_bench_results():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import readme_tables
    finally:
        sys.path.remove(str(REPO / "bench"))
    text = README.read_text(encoding="utf-8")
    assert set(readme_tables.blocks(text)) == {"demo", "demo_rlhf", "benchmarks"}
    assert readme_tables.render(text) == text, \
        "README.md's generated tables are out of date: run python bench/readme_tables.py"
    # Each results table appears, and an edited figure would be caught.
    for path in (REPO / "bench" / "results").glob("*_cpu.md"):
        assert readme_tables.first_table(path.read_text())[1][2] in text, path.name
    edited = text.replace("| zero-shot |", "| zero-shot (typed) |", 1)
    assert edited != text and readme_tables.render(edited) != edited


# ---- python blocks ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded_smollm2():
    return fastpeft.models.load_model("smollm2-135m")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("code,line", PYTHON, ids=[f"README.md:{line}" for _, line in PYTHON])
def test_python_block_runs(code, line, workdir, loaded_smollm2, monkeypatch):
    model, tokenizer = loaded_smollm2

    def load_model(name, *args, **kwargs):
        assert name == "smollm2-135m", f"README.md:{line}: load_model({name!r})"
        return copy.deepcopy(model), tokenizer

    monkeypatch.setattr(fastpeft.models, "load_model", load_model)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    for path in re.findall(r'"(out/[\w./-]+)"', code):  # the outputs the block names
        assert (workdir / path).exists(), f"README.md:{line}: {path} was not written"


# ---- shell blocks -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    parent = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return {**parent, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "python"),
                                           os.environ.get("PYTHONPATH", "")]), **extra}


def run(argv, cwd, env=None, timeout=900) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (shlex.join(argv) + "\n" + proc.stdout[-3000:]
                                  + proc.stderr[-4000:])
    return proc.stdout


class ShellRunner:
    """Runs one README shell block's commands in order, in a temporary working directory."""

    def __init__(self, workdir: Path, tiny: str):
        self.cwd, self.tiny, self.target = workdir, tiny, workdir / "pip-target"

    def overrides(self, argv: list[str]) -> list[str]:
        named = any(a.startswith("model=") for a in argv)
        return ([] if named else [f"model={self.tiny}"]) + ["train.max_steps=1"]

    def make_demo(self, env, argv):
        out = self.cwd / "demo_out"
        printed = run(["make", "demo", f"DEMO_ARGS=--quick --out {out}"], REPO,
                      child_env(OMP_NUM_THREADS="2"))
        results = json.loads((out / "results.json").read_text())
        assert [r["method"] for r in results["rows"]][-1] == "LoRA SFT"
        assert re.search(r"^accuracy before: \d+% after: \d+%$", printed, re.M), printed[-2000:]
        assert (out / "adapter" / "adapter_model.safetensors").is_file()

    def make_test(self, env, argv):
        assert "pytest" in run(["make", "-n", "test"], REPO)

    def pip_install(self, env, argv):
        run([sys.executable, "-m", *argv, "--no-deps", "--target", str(self.target), "-q"], REPO,
            child_env(**env))
        assert (self.target / "fastpeft" / "__init__.py").is_file()

    def python_c(self, env, argv):
        installed = child_env(**env, PYTHONPATH=str(self.target))
        where = run([sys.executable, "-c", "import fastpeft; print(fastpeft.__file__)"],
                    self.cwd, installed)
        assert where.startswith(str(self.target)), where
        out = run([sys.executable, *argv[1:]], self.cwd, installed)
        assert "'extension': True" in out, out

    def fastpeft(self, env, argv):
        args = argv[1:] + (self.overrides(argv) if argv[1] in STAGES else [])
        threads = torch.get_num_threads()
        try:
            assert cli.main(args) == 0, shlex.join(argv)
        finally:
            torch.set_num_threads(threads)

    def rank(self, env, argv):
        source = self.cwd / argv[argv.index("--input") + 1]
        rng = random.Random(0)
        orders = []
        for line in source.read_text().splitlines():
            k = len(json.loads(line)["responses"])
            orders.append(" ".join(str(i + 1) for i in rng.sample(range(k), k)))
        proc = subprocess.run([sys.executable, "-m", "fastpeft", *argv[1:]], cwd=self.cwd,
                              env=child_env(), input="\n".join(orders) + "\n", text=True,
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        ranked = self.cwd / argv[argv.index("--output") + 1]
        rows = [json.loads(line) for line in ranked.read_text().splitlines()]
        assert len(rows) == len(orders) and all(r["ranking"] is not None for r in rows)

    def torchrun(self, env, argv):
        split = argv.index("-m")
        launcher = [a for a in argv[1:split]
                    if not a.startswith(("--nproc_per_node", "--nnodes", "--node_rank",
                                         "--master_addr", "--master_port"))]
        program = argv[split:] + self.overrides(argv)
        base = [sys.executable, "-m", "torch.distributed.run", *launcher]
        nodes = next((int(a.split("=")[1]) for a in argv if a.startswith("--nnodes=")), 1)
        if nodes == 1:
            run([*base, "--standalone", "--nproc_per_node=2", *program], self.cwd)
            return
        port = free_port()
        procs = [subprocess.Popen(
            [*base, f"--nnodes={nodes}", f"--node_rank={rank}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", *program],
            cwd=self.cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True) for rank in range(nodes)]
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"node {rank}: {out[-4000:]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("code,line", SHELL, ids=[f"README.md:{line}" for _, line in SHELL])
def test_shell_block_runs(code, line, workdir, tiny):
    runner = ShellRunner(workdir, tiny)
    for env, argv in commands(code):
        getattr(runner, runner_of(argv))(env, argv)
    if "fastpeft merge" in code:
        assert (workdir / "out" / "sft-merged" / "config.json").is_file()
    if "fastpeft rank" in code:
        assert (workdir / "out" / "rm" / "reward_model.json").is_file()
        assert (workdir / "out" / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    if "torchrun" in code:
        assert (workdir / "out" / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_commands_parse_continuations_comments_and_env():
    code = 'A="8.0;9.0" pip install --no-build-isolation .  # note\ntorchrun --nnodes=2 \\\n' \
           '    -m fastpeft sft --config x.yaml\n'
    assert commands(code) == [({"A": "8.0;9.0"}, ["pip", "install", "--no-build-isolation",
                                                  "."]),
                              ({}, ["torchrun", "--nnodes=2", "-m", "fastpeft", "sft",
                                    "--config", "x.yaml"])]
    with pytest.raises(AssertionError, match="no runner"):
        runner_of(["rm", "-rf", "/"])
