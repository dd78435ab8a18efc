"""Reading datasets from local json / jsonl / parquet / csv files or a hub id, validating each
row against its format, and building the tokenized SFT / preference / prompt datasets.

json and jsonl are parsed here line by line (so a bad row is reported by its line number, and
rows of mixed types reach validation instead of failing inside pyarrow); parquet, csv and hub
datasets are read with the `datasets` library and reported by row number. A malformed row
raises DataError naming the file, the line or row and what is wrong; with skip_invalid=True
it is skipped, counted in the returned stats and logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastpeft.data import formats
from fastpeft.data.formats import InvalidRowError
from fastpeft.data.packing import pack
from fastpeft.data.tokenize import num_trained, tokenize_pair, tokenize_prompt, tokenize_sft

logger = logging.getLogger("fastpeft.data")

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A malformed row: the message names the file, the line or row, and the problem."""


@dataclass
class DataStats:
    """What loading did: rows read, rows skipped as invalid (with the first messages), the
    format used, examples dropped because truncation left nothing to train on, ranked rows
    skipped because their ranking is null (not ranked yet)."""

    source: str = ""
    format: str | None = None
    rows: int = 0
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    examples: int = 0
    dropped_empty: int = 0
    unranked: int = 0


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", InvalidRowError(f"bad JSON: {e.msg} at column {e.colno}")


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name
            yield from _jsonl_records(path)
            return
        raise DataError(f"{path}, line {e.lineno}: bad JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows or one JSON object per line")
    for i, row in enumerate(data):
        yield f"item {i}", row


def _dataset_records(source: str, kind: str | None, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if kind is None:
            ds = datasets.load_dataset(source, split=split)
        elif kind == "csv":  # every column a string ("12" stays text), empty fields ""
            ds = datasets.load_dataset(
                kind,
                data_files=source,
                split="train",
                features=_csv_string_features(source),
                keep_default_na=False,
            )
        else:
            ds = datasets.load_dataset(kind, data_files=source, split="train")
    except Exception as e:  # datasets raises many types (network, parse, missing split)
        raise DataError(f"{source}: cannot load: {type(e).__name__}: {e}") from e
    for i, row in enumerate(ds):
        yield (f"row {i + 1}" if kind != "csv" else f"row {i + 1} (after the header)"), row


def _csv_string_features(path: str):
    import csv

    import datasets

    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(location, row) for each row of a local file, a local dataset folder or a hub id (the
    `split` of the last two); row is an InvalidRowError where it could not even be parsed."""
    ext = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):  # a saved or raw dataset folder: datasets picks the builder
        return _dataset_records(source, None, split)
    if os.path.exists(source):
        if ext not in FILE_TYPES:
            raise DataError(
                f"{source}: unknown file type {ext!r}; expected one of {sorted(FILE_TYPES)}"
            )
        if ext == ".jsonl":
            return _jsonl_records(source)
        if ext == ".json":
            return _json_records(source)
        return _dataset_records(source, FILE_TYPES[ext], split)
    if ext in FILE_TYPES:
        raise DataError(f"{source}: no such file")
    return _dataset_records(source, None, split)


def load_rows(
    source: str,
    format: str | None = None,
    skip_invalid: bool = False,
    split: str = "train",
    mode: str = "sft",
    transform: Callable[[Any], Any] | None = None,
) -> tuple[list[Any], DataStats]:
    """Validated, normalized rows of `source` and the stats. The format is `format` or, when
    None, the one detected on the first row that has one; every row must then fit it.

    mode: "sft" -> formats.normalize_sft per row; "preference" -> a list of pairs per row;
    "prompt" -> formats.prompt_of per row. transform (e.g. tokenization) is applied to each
    normalized row inside the same check, so its errors name the row too."""
    if format is not None and format not in formats.FORMATS:
        raise ValueError(f"format must be one of {formats.FORMATS}, got {format!r}")
    if mode not in ("sft", "preference", "prompt"):
        raise ValueError(f"mode must be 'sft', 'preference' or 'prompt', got {mode!r}")
    stats = DataStats(source=source, format=format)
    out = []
    for where, row in read_records(source, split):
        stats.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise InvalidRowError(f"expected a JSON object, got {type(row).__name__}")
            if stats.format is None:
                stats.format = formats.detect_format(row)
            normalized = _normalize(row, stats.format, mode)
            out.append(transform(normalized) if transform else normalized)
        except InvalidRowError as e:
            message = f"{source}, {where}: {e}" + (
                f" (format {stats.format})" if stats.format else ""
            )
            if not skip_invalid:
                raise DataError(message) from None
            stats.skipped += 1
            if len(stats.skipped_messages) < 10:
                stats.skipped_messages.append(message)
    if stats.skipped:
        logger.warning(
            "%s: skipped %d invalid row(s) of %d; first: %s",
            source,
            stats.skipped,
            stats.rows,
            stats.skipped_messages[0],
        )
    if not out:
        raise DataError(f"{source}: no valid rows (read {stats.rows}, skipped {stats.skipped})")
    return out, stats


def _normalize(row: dict, fmt: str, mode: str):
    if mode == "prompt":
        return formats.prompt_of(row, fmt)
    if mode == "preference":
        if fmt not in formats.PREFERENCE_FORMATS:
            raise InvalidRowError(f"preference data needs format preference or ranked, not {fmt}")
        return formats.normalize_preference(row, fmt)
    if fmt not in formats.SFT_FORMATS:
        raise InvalidRowError(f"SFT data needs one of {formats.SFT_FORMATS}, not {fmt}")
    return formats.normalize_sft(row, fmt)


def load_sft_dataset(
    source: str,
    tokenizer,
    max_length: int | None = None,
    format: str | None = None,
    packing: bool = False,
    skip_invalid: bool = False,
    split: str = "train",
) -> tuple[list[dict], DataStats]:
    """Tokenized SFT examples (input_ids / labels / attention_mask, or packed rows with
    position_ids when packing; packing needs max_length) and the stats."""
    if packing and not max_length:
        raise ValueError("packing needs max_length")
    tokenized, stats = load_rows(
        source,
        format,
        skip_invalid,
        split,
        "sft",
        transform=lambda sft: tokenize_sft(tokenizer, sft, max_length),
    )
    examples = []
    for ex in tokenized:
        if num_trained(ex) == 0:
            stats.dropped_empty += 1
            continue
        examples.append(ex)
    _log_dropped(stats)
    if packing:
        examples = pack(examples, max_length)
    stats.examples = len(examples)
    return examples, stats


def load_preference_dataset(
    source: str,
    tokenizer,
    max_length: int | None = None,
    format: str | None = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> tuple[list[dict], DataStats]:
    """Tokenized chosen / rejected pairs (ranked rows expanded to all their pairs; `group` is
    the index of the row a pair came from) and the stats."""
    tokenized, stats = load_rows(
        source,
        format,
        skip_invalid,
        split,
        "preference",
        transform=lambda pairs: [tokenize_pair(tokenizer, p, max_length) for p in pairs],
    )
    examples = []
    for group, pairs in enumerate(tokenized):
        stats.unranked += not pairs  # a ranked row with ranking null
        for ex in pairs:
            if num_trained(ex, "chosen_") == 0 or num_trained(ex, "rejected_") == 0:
                stats.dropped_empty += 1
                continue
            examples.append(dict(ex, group=group))
    if stats.unranked:
        logger.warning("%s: skipped %d of %d row(s) with ranking null (not ranked yet)",
                       source, stats.unranked, stats.rows)
        if not examples:
            raise DataError(f"{source}: no ranked rows ({stats.unranked} with ranking null; "
                            "rank them with `fastpeft rank`)")
    _log_dropped(stats)
    stats.examples = len(examples)
    return examples, stats


def load_prompt_dataset(
    source: str,
    tokenizer,
    max_length: int | None = None,
    format: str | None = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> tuple[list[dict], DataStats]:
    """Prompts for PPO (input_ids / attention_mask / prompt text, to be left padded), taken
    from any format: a prompt field, or the turns before the final answer."""
    examples, stats = load_rows(
        source,
        format,
        skip_invalid,
        split,
        "prompt",
        transform=lambda p: tokenize_prompt(tokenizer, p, max_length),
    )
    stats.examples = len(examples)
    return examples, stats


def _log_dropped(stats: DataStats) -> None:
    if stats.dropped_empty:
        logger.warning(
            "%s: dropped %d example(s) left with no trained tokens after truncation",
            stats.source,
            stats.dropped_empty,
        )
