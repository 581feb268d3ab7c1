"""Where rows come from: bundled files, local JSONL/CSV/Parquet files, or a Hugging Face dataset id.

Every source yields a list of plain dicts; the task validates columns and values.  The hub path
(``hf:ID[:CONFIG]:SPLIT``) is for users with a network; tests exercise the same code on local files.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from fedlora.errors import DataError

_BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED: dict[str, Path] = {
    "sst2/train": _BUNDLED_DIR / "sst2_train.jsonl.gz",
    "sst2/validation": _BUNDLED_DIR / "sst2_validation.jsonl.gz",
    "qnli/train": _BUNDLED_DIR / "qnli_train.jsonl.gz",
    "qnli/validation": _BUNDLED_DIR / "qnli_validation.jsonl.gz",
    "superni/train": _BUNDLED_DIR / "superni_train.jsonl.gz",
    "superni/validation": _BUNDLED_DIR / "superni_validation.jsonl.gz",
    "superni/test": _BUNDLED_DIR / "superni_test.jsonl.gz",
    "superni/tasks": _BUNDLED_DIR / "superni_tasks.jsonl.gz",
    "rte/train": _BUNDLED_DIR / "rte_train.jsonl.gz",
    "rte/validation": _BUNDLED_DIR / "rte_validation.jsonl.gz",
    "mnli/train": _BUNDLED_DIR / "mnli_train.jsonl.gz",
    "mnli/validation": _BUNDLED_DIR / "mnli_validation.jsonl.gz",
    "dolly/train": _BUNDLED_DIR / "dolly_train.jsonl.gz",
    "dolly/test": _BUNDLED_DIR / "dolly_test.jsonl.gz",
}


def read_rows(source: str) -> list[dict]:
    """Read every row of ``source`` (see module docstring for the accepted forms)."""
    if source.startswith("bundled:"):
        name = source[len("bundled:"):]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled data {source!r}; available: {', '.join('bundled:' + b for b in BUNDLED)}")
        return _read_file(BUNDLED[name])
    if source.startswith("hf:"):
        return _read_hub(source[3:])
    return _read_file(Path(source))


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1].lstrip(".") if suffixes else ""


def _read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    kind = _kind(path)
    try:
        if kind in ("jsonl", "ndjson"):
            return _read_jsonl(path)
        if kind == "json":
            with _open_text(path) as fh:
                data = json.load(fh)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: a .json data file must hold a list of objects")
            return data
        if kind in ("csv", "tsv"):
            with _open_text(path) as fh:
                return list(csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ","))
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    except Exception as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot parse as {kind} ({type(exc).__name__}: {exc})") from None
    raise DataError(f"{path}: unsupported file type {kind!r}; use .jsonl, .json, .csv, .tsv or .parquet (optionally .gz)")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


def _read_hub(spec: str) -> list[dict]:
    """``ID[:CONFIG]:SPLIT`` through ``datasets.load_dataset`` (needs a network unless cached)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise DataError(f"hub source must be 'hf:DATASET_ID[:CONFIG]:SPLIT', got 'hf:{spec}'")
    import datasets

    ds_id, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    try:
        ds = datasets.load_dataset(ds_id, config, split=split)
    except Exception as exc:
        raise DataError(f"cannot load hub dataset {ds_id!r} (config {config}, split {split}): {exc}") from None
    return ds.to_list()
