"""The run-folder format has one owner, :mod:`pipeline.run_folder`: what training writes reads back
through it, a folder in the format today's runs were written in still reads, and no other module
opens a run-folder file by its name."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import run_folder as rf
from pipeline.report import read_metrics as report_metrics
from pipeline.report import run_split

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "hlss_model", "flows", "hlss")


def test_a_trained_run_reads_back_through_the_module(train_store, tiny_text_model, tmp_path):
    from tiny_training import tiny_config

    from hlss_model.runs import load_run_model
    from hlss_model.train import train

    run = tmp_path / "run"
    train(train_store, run, tiny_config(tiny_text_model, steps=2, checkpoint_every=1, keep_checkpoints=1),
          progress=False)
    folder = rf.RunFolder(run)
    meta = folder.read_meta()
    assert meta["format"] == rf.RUN_FORMAT and meta["method"] == "hlss" and meta["seed"] == 7
    assert rf.read_run(run) == meta == json.loads((run / "run.json").read_text())
    assert folder.read_config() == yaml.safe_load((run / "config.yaml").read_text())
    assert folder.read_config()["steps"] == 2
    assert [r["step"] for r in folder.read_metrics()] == [1, 2] == [r["step"] for r in report_metrics(run)]
    assert folder.has_checkpoint() and folder.latest_step() == 2 and folder.is_run() and rf.is_run_folder(run)
    assert [p.name for p in folder.checkpoint_dirs()] == ["step_00000002"]  # keep_checkpoints=1
    assert folder.weights() == run / "model.safetensors" and folder.attributes.is_file()
    state = json.loads((folder.checkpoint(2) / rf.STATE).read_text())
    assert state["step"] == 2 and state["saved"].endswith("+00:00")  # UTC, ISO 8601
    assert run_split([tmp_path / "nothing", run]) == meta["split"]
    assert not [p.name for p in run.rglob("*.tmp")]  # no temporary file left behind
    model, again = load_run_model(run)
    assert again == meta and model.feature_dim == meta["feature_dim"]


def _old_run(run: Path) -> Path:
    """A run folder as main wrote it before the module existed: hand-made, file by file."""
    from safetensors.numpy import save_file
    import numpy as np

    ckpt = run / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "hidisc", "steps": 3, "seed": 5}, sort_keys=False))
    (run / "run.json").write_text(json.dumps({
        "format": 1, "method": "hidisc", "backbone": "resnet10t", "feature_dim": 512, "embed_dim": 128,
        "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "seed": 5, "weights": None, "head_init": "random",
        "store": "/data/store.zarr", "class_names": ["a", "b"], "split": {"P1": "train", "P2": "test"}}, indent=2))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "lr": 0.001}\n{"step": 2, "lo'  # killed mid-line
                                       '\n{"step": 3, "loss": 2.0, "lr": 0.001}\n')
    save_file({"w": np.zeros(2, np.float32)}, str(ckpt / "model.safetensors"))
    (ckpt / "optimizer.pt").write_bytes(b"")
    (ckpt / "state.json").write_text(json.dumps({"step": 3, "optimizer_state": "optimizer.pt",
                                                 "model": "model.safetensors", "saved": "2026-11-30T14:02:11+0100"}))
    (run / "latest.json").write_text(json.dumps({"step": 3, "path": "checkpoints/step_00000003"}))
    (run / "knn-r10.json").write_text(json.dumps({"levels": {}, "evaluated": "2026-11-30T14:05:00+0100"}))
    return run


def test_an_old_run_folder_still_reads(tmp_path):
    run = _old_run(tmp_path / "old")
    folder = rf.RunFolder(run)
    assert folder.read_meta()["split"] == {"P1": "train", "P2": "test"} == run_split([run])
    assert [r["step"] for r in folder.read_metrics()] == [1, 3]  # the half-written line is skipped
    assert folder.has_checkpoint() and folder.latest_step() == 3
    assert folder.weights() == run / "checkpoints" / "step_00000003" / "model.safetensors"  # no final weights yet
    assert folder.knn_results() == {"knn-r10": {"levels": {}, "evaluated": "2026-11-30T14:05:00+0100"}}
    assert folder.read_config()["method"] == "hidisc"

    from flows.steps import run_state, training_curve

    assert run_state(str(run)) == {"exists": True, "step": 3, "steps": 3, "finished": False}
    assert training_curve(str(run)) == [(1, 2.5), (3, 2.0)]


def test_what_is_not_a_run_says_so(tmp_path):
    folder = rf.RunFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty: not a training run \(no run.json\)"):
        folder.read_meta()
    assert not folder.is_run() and not folder.has_checkpoint() and folder.latest_step() == 0
    assert folder.read_metrics() == [] and folder.knn_results() == {} and run_split([folder.path]) == {}
    with pytest.raises(FileNotFoundError, match="no model.safetensors and no checkpoint yet"):
        folder.weights()
    (tmp_path / "tmp").mkdir()
    partial = rf.RunFolder(tmp_path / "tmp")
    partial.checkpoint_tmp(1).mkdir(parents=True)  # a checkpoint being written is not one yet
    assert not partial.has_checkpoint()


def _name_uses(path: Path) -> list[str]:
    """``line: 'name'`` for each string constant in ``path``'s code (docstrings and messages excluded)
    that names a run-folder file: the name itself, or a path of the checkpoints folder."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if text in rf.FILE_NAMES or text.startswith((f"{rf.CHECKPOINTS}/", "step_", ".step_")):
                hits.append(f"{node.lineno}: {text!r}")
    return hits


# the encoder registry names files in Hugging Face hub repositories, whose standard weights file name
# happens to be the run folder's (model.safetensors): that one name, in those modules, is not a run file
_HUB_FILE_NAMES = {"hlss_model/encoder_zoo.py": {"'model.safetensors'"},
                   "hlss_model/checkpoints.py": {"'model.safetensors'"}}


def test_no_module_but_the_run_folder_module_opens_run_files_by_name():
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            if path == ROOT / "pipeline" / "run_folder.py":
                continue
            hub = _HUB_FILE_NAMES.get(path.relative_to(ROOT).as_posix(), set())
            hits = [h for h in _name_uses(path) if h.split(": ", 1)[1] not in hub]
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    assert found == {}, f"run-folder file names used outside pipeline/run_folder.py: {found}"
    assert _name_uses(ROOT / "pipeline" / "run_folder.py")  # the check sees the names where they are


def test_pipeline_needs_no_torch():
    """Tiling, the store, the report, export and the run-folder format import without torch."""
    code = ("import sys, pipeline.run_folder, pipeline.runner, pipeline.store, pipeline.tiler, pipeline.report, "
            "pipeline.export; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
