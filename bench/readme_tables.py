"""The README's measured tables, generated from bench/results/ so that no figure in the README is
typed by hand.

The README holds generated blocks between marker lines:

    <!-- generated:NAME (bench/readme_tables.py) -->
    ...
    <!-- end generated:NAME -->

NAME is `demo` (the table of bench/results/demo_cpu.json, a copy of the results.json that
`make demo` writes), `demo_rlhf` (the same of `fastpeft demo --rlhf`,
bench/results/demo_rlhf_cpu.json) or `benchmarks` (the first table of every
bench/results/*_cpu.md, the files the benchmark scripts write, each under its own title line).
The `note` field of a demo results file, when there is one, says how the run was made.
tests/test_readme.py fails when a block differs from what this script generates now.

    python bench/readme_tables.py           # rewrite the blocks in README.md
    python bench/readme_tables.py --check   # exit 1 when README.md is out of date
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
# The end-to-end and methods tables first (what a user compares), then the ops.
SUITE_ORDER = ("e2e", "methods")
BLOCK = re.compile(r"(<!-- generated:(\w+) \(bench/readme_tables\.py\) -->\n)(.*?)"
                   r"(<!-- end generated:\2 -->)", re.S)


def first_table(markdown: str) -> tuple[str, list[str]]:
    """(the title line without '# ', the lines of the first markdown table) of a results file."""
    lines = markdown.splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
    table: list[str] = []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return title, table


def benchmarks_block(results: Path = RESULTS) -> str:
    """Every `<name>_cpu.md` in results/ (quick runs excluded): its title, first table and
    source file."""
    files = sorted(results.glob("*_cpu.md"))
    rank = {name: i for i, name in enumerate(SUITE_ORDER)}
    files.sort(key=lambda p: (rank.get(p.stem[:-len("_cpu")], len(rank)), p.name))
    parts = []
    for path in files:
        title, table = first_table(path.read_text(encoding="utf-8"))
        if not table:
            continue
        parts.append(f"**{title}** (`bench/results/{path.name}`)\n\n" + "\n".join(table) + "\n")
    return "\n".join(parts)


def _demo_rows(rows: list[dict]) -> list[str]:
    lines = ["| method | held-out accuracy | trainable params | train time | eval time |",
             "|---|---|---|---|---|"]
    for row in rows:
        train = f"{row['train_s']:.0f} s" if row.get("train_s") else "-"
        lines.append(f"| {row['method']} | {100 * row['accuracy']:.0f}% | {row['trainable']:,} | "
                     f"{train} | {row['eval_s']:.0f} s |")
    return lines


def _load(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text(encoding="utf-8"))


def demo_block(results: Path = RESULTS) -> str:
    """The demo's table (bench/results/demo_cpu.json: `make demo`'s results.json) and its
    settings."""
    data = _load(results, "demo_cpu.json")
    return ("\n".join(_demo_rows(data["rows"])) + "\n\n"
            f"{data['n_train']} training and {data['n_eval']} held-out questions, "
            f"{data['steps']} steps of {data['batch_size']}, lr {data['lr']}, LoRA r="
            f"{data['rank']}; the whole demo took {data['wall_s']:.0f} s"
            + (f" ({data['note']})" if data.get("note") else "") + ".\n")


def demo_rlhf_block(results: Path = RESULTS) -> str:
    """`fastpeft demo --rlhf` (bench/results/demo_rlhf_cpu.json): the reward model's and the
    PPO policy's rows, then the PPO line (mean reward before / after, KL)."""
    data = _load(results, "demo_rlhf_cpu.json")
    r = data["rlhf"]
    rows = [row for row in data["rows"] if row["method"] in ("reward model (pairwise)",
                                                             "SFT + PPO")]
    return ("\n".join(_demo_rows(rows)) + "\n\n"
            f"The reward model: {r['rm_steps']} steps on {r['n_pref_train']} preference pairs, "
            f"pairwise accuracy on {r['n_pref_heldout']} held-out pairs. PPO: {r['ppo_steps']} "
            f"iterations of {r['ppo_batch_size']} prompts; held-out prompts sampled at "
            f"temperature {r['temperature']}: mean reward {r['reward_before']:.2f} before, "
            f"{r['reward_after']:.2f} after; sampled exact match "
            f"{100 * r['sampled_accuracy_before']:.0f}% before, "
            f"{100 * r['sampled_accuracy_after']:.0f}% after; KL to the SFT policy "
            f"{r['kl_after']:.2f} nats per sequence. The whole `fastpeft demo --rlhf` took "
            f"{data['wall_s']:.0f} s" + (f" ({data['note']})" if data.get("note") else "")
            + ".\n")


GENERATORS = {"demo": demo_block, "demo_rlhf": demo_rlhf_block, "benchmarks": benchmarks_block}


def render(readme_text: str, results: Path = RESULTS) -> str:
    """readme_text with every generated block replaced by what the generators give now."""
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise ValueError(f"README block 'generated:{name}': unknown name, expected one of "
                             f"{sorted(GENERATORS)}")
        return match.group(1) + GENERATORS[name](results) + match.group(4)

    return BLOCK.sub(replace, readme_text)


def blocks(readme_text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(readme_text)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when README.md differs from the results")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's generated tables are out of date: run "
                  "python bench/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"README.md: {len(blocks(new))} generated blocks ({', '.join(blocks(new))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
