"""Data sources: bundled SST-2, local JSONL/JSON/CSV/TSV/Parquet (gzip too), clear errors for broken files."""
import gzip
import json

import pytest

from fedlora.data.sources import read_rows
from fedlora.errors import DataError

ROWS = [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]


def test_bundled_sst2_is_complete():
    train = read_rows("bundled:sst2/train")
    val = read_rows("bundled:sst2/validation")
    assert len(train) == 67349 and len(val) == 872
    assert set(train[0]) == {"idx", "sentence", "label"}


def test_bundled_qnli_is_the_subset_and_full_dev_split():
    train = read_rows("bundled:qnli/train")
    val = read_rows("bundled:qnli/validation")
    assert len(train) == 10475 and len(val) == 5463
    assert set(train[0]) == {"idx", "question", "sentence", "label"}
    pairs = {(r["question"], r["sentence"]) for r in train}
    assert not pairs & {(r["question"], r["sentence"]) for r in val}


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.csv", "d.tsv", "d.parquet"])
def test_local_formats(tmp_path, name):
    p = tmp_path / name
    if name.startswith("d.jsonl"):
        text = "\n".join(json.dumps(r) for r in ROWS) + "\n\n"
        (gzip.open(p, "wt", encoding="utf-8") if name.endswith(".gz") else open(p, "w")).write(text)
    elif name == "d.json":
        p.write_text(json.dumps(ROWS))
    elif name in ("d.csv", "d.tsv"):
        sep = "," if name == "d.csv" else "\t"
        p.write_text(f"sentence{sep}label\n" + "".join(f"{r['sentence']}{sep}{r['label']}\n" for r in ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), p)
    rows = read_rows(str(p))
    assert [r["sentence"] for r in rows] == ["a fine film", "dull"]
    assert [str(r["label"]) for r in rows] == ["1", "0"]


@pytest.mark.parametrize("content, match", [
    (b'{"a": 1}\n{broken\n', "d.jsonl:2: invalid JSON"),
    (b'[1, 2]\n', "d.jsonl:1: each line must be a JSON object"),
    (b'{"sentence": "caf\xe9"}\n', "not valid UTF-8"),
])
def test_broken_jsonl(tmp_path, content, match):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_rows(str(p))


def test_unsupported_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_rows(str(tmp_path / "none.jsonl"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(str(tmp_path / "d.xlsx"))
    (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_rows(str(tmp_path / "d.jsonl.gz"))
    with pytest.raises(DataError, match="unknown bundled"):
        read_rows("bundled:nope")
    with pytest.raises(DataError, match="hf:DATASET_ID"):
        read_rows("hf:only_id")
