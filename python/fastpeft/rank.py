"""`fastpeft rank`: a terminal tool for people to rank the K responses of each prompt written by
`fastpeft sample`.

It shows a prompt and its responses numbered 1..K and reads an order, best first: `2 1 3`
means response 2 is the best, then 1, then 3 (spaces or commas between the numbers). The
order is stored as the `ranking` field of the `ranked` format of fastpeft.data: 0-based
response indices, best first (`2 1 3` -> `[1, 0, 2]`), so the reward model trains on
RANKED.jsonl directly (each ranking gives its K(K-1)/2 pairs). `s` skips a prompt (it keeps
`ranking: null` and `meta.skipped: true`; the reward model skips it), `q` quits.

A malformed order (empty, not numbers, out of range, a duplicate, a missing response) is
rejected with a message saying what is wrong, and the prompt is asked again. RANKED.jsonl
holds every input row, ranked or not, and is rewritten atomically (temp file, fsync, rename)
after every prompt, so an interrupted session (Ctrl-C, end of input, a crash) loses at most
the prompt on screen; run the same command again and it resumes at the first prompt neither
ranked nor skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO


class OrderError(ValueError):
    """An order that is not a ranking of the K responses; the message says why."""


def parse_order(text: str, k: int) -> list[int]:
    """The 0-based ranking (best first) of a typed 1-based order such as `2 1 3`."""
    tokens = text.replace(",", " ").split()
    if not tokens:
        raise OrderError(f"empty order: type the {k} response numbers best first, e.g. "
                         f"`{' '.join(str(i) for i in range(k, 0, -1))}`")
    numbers = []
    for token in tokens:
        if not token.isdigit():
            raise OrderError(f"{token!r} is not a response number (expected integers 1..{k})")
        n = int(token)
        if not 1 <= n <= k:
            raise OrderError(f"{n} is out of range: the responses are numbered 1..{k}")
        if n in numbers:
            raise OrderError(f"{n} appears twice: each response gets one place")
        numbers.append(n)
    missing = [n for n in range(1, k + 1) if n not in numbers]
    if missing:
        raise OrderError(f"missing {' '.join(map(str, missing))}: rank all {k} responses "
                         f"(got {len(numbers)})")
    return [n - 1 for n in numbers]


def read_rows(path: str) -> list[dict]:
    """The rows of a `fastpeft sample` output (DataError naming the line of a bad one)."""
    from fastpeft.data import DataError

    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("responses"), list) \
                    or "prompt" not in row or len(row["responses"]) < 2:
                raise DataError(f"{path}, line {line_no}: expected a row of `fastpeft sample` "
                                 "{prompt, responses: [at least 2], ranking, meta}")
            rows.append(row)
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """Atomic rewrite: a temp file next to `path`, fsync, rename over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume(inputs: list[dict], saved: list[dict], input_path: str, output_path: str):
    """The saved rows when they are the input's rows (same prompts and responses)."""
    from fastpeft.data import DataError

    if len(saved) != len(inputs) or any(
            s["prompt"] != r["prompt"] or s["responses"] != r["responses"]
            for s, r in zip(saved, inputs)):
        raise DataError(f"--output {output_path} holds rankings of other prompts or responses "
                         f"than --input {input_path}; pass another --output to start afresh")
    return saved


def _pending(row: dict) -> bool:
    return row.get("ranking") is None and not (row.get("meta") or {}).get("skipped")


def show(row: dict, position: int, total: int, out: IO) -> None:
    prompt = row["prompt"]
    if isinstance(prompt, list):  # messages
        prompt = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in prompt)
    bar = "=" * 72
    print(f"{bar}\nPrompt {position} of {total}\n{bar}\n{prompt}\n", file=out)
    for n, response in enumerate(row["responses"], 1):
        if isinstance(response, list):
            response = "\n".join(str(m.get("content")) for m in response)
        print(f"--- response {n} ---\n{response}\n", file=out)


def rank(input_path: str, output_path: str, stdin: IO | None = None,
         stdout: IO | None = None) -> dict:
    """The interactive loop; returns {"ranked", "skipped", "pending", "total"} at the end."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    rows = read_rows(input_path)
    if os.path.exists(output_path):
        rows = _resume(rows, read_rows(output_path), input_path, output_path)
    todo = [i for i, row in enumerate(rows) if _pending(row)]
    done = len(rows) - len(todo)
    if done:
        print(f"fastpeft rank: resuming {output_path}: {done} of {len(rows)} prompts already "
              "ranked or skipped", file=stdout)
    quit_early = False
    for i in todo:
        row = rows[i]
        k = len(row["responses"])
        show(row, i + 1, len(rows), stdout)
        while True:
            print(f"Order, best first (e.g. `{' '.join(str(n) for n in range(1, k + 1))}`; "
                  "s: skip, q: quit): ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:  # end of input: stop, everything decided so far is saved
                quit_early = True
                print("", file=stdout)
                break
            text = line.strip()
            if text.lower() in ("q", "quit"):
                quit_early = True
                break
            if text.lower() in ("s", "skip"):
                row["meta"] = dict(row.get("meta") or {}, skipped=True)
                break
            try:
                row["ranking"] = parse_order(text, k)
                break
            except OrderError as e:
                print(f"  {e}; try again.", file=stdout)
        if quit_early:
            break
        write_rows(output_path, rows)
    if not os.path.exists(output_path):
        write_rows(output_path, rows)
    counts = {"ranked": sum(r.get("ranking") is not None for r in rows),
              "skipped": sum(bool((r.get("meta") or {}).get("skipped")) for r in rows),
              "pending": sum(_pending(r) for r in rows), "total": len(rows)}
    how = ("stopped; run the same command again to resume" if counts["pending"]
           else "all prompts done")
    print(f"fastpeft rank: {counts['ranked']} ranked, {counts['skipped']} skipped, "
          f"{counts['pending']} to go of {counts['total']} ({how}); saved to {output_path}",
          file=stdout)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="OUT.jsonl",
                        help="the rows written by `fastpeft sample`")
    parser.add_argument("--output", required=True, metavar="RANKED.jsonl",
                        help="the input's rows with `ranking` filled; resumed when it exists")


def run(args: argparse.Namespace) -> int:
    try:
        rank(args.input, args.output)
    except KeyboardInterrupt:  # Ctrl-C: every prompt ranked before this one is saved
        print(f"\nfastpeft rank: interrupted; saved to {args.output}; run the same command "
              "again to resume")
        return 130
    return 0
