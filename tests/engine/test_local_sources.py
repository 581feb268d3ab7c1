"""The hub code paths, exercised offline on local files: a model directory and a `datasets` folder (hf:PATH:SPLIT)."""
import json
import shutil

import pytest
import torch

from fedlora.data.sources import BUNDLED, read_rows
from fedlora.engine.simulation import run_experiment
from fedlora.models import resolve_model_path


@pytest.fixture
def local_model_dir(toy_model_dir):
    return toy_model_dir


def test_hf_source_reads_a_local_datasets_folder(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) for i in range(5)))
    rows = read_rows(f"hf:{d}:train")
    assert len(rows) == 5 and rows[0] == {"sentence": "s0", "label": 0}


def test_run_with_a_local_model_directory_and_hf_style_data(tmp_path, local_model_dir, tiny_config):
    d = tmp_path / "ds"
    d.mkdir()
    shutil.copy(BUNDLED["sst2/validation"], d / "validation.jsonl.gz")
    cfg = tiny_config(f"model.name={local_model_dir}", f"data.validation=hf:{d}:validation", "rounds=1",
                      "method=fedit")
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(res.adapter.modules) == 4  # 2 layers × (query, value)
    assert all(m.A.shape == (8, 32) for m in res.adapter.modules.values())
    assert (res.run_dir / "adapter" / "adapter_model.safetensors").is_file()
