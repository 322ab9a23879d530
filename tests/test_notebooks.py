"""Both notebooks executed (nbclient, kernel python3) against a tiny run with a CSV logger and an export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codiemb_pl.cli.main import main

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
KERNEL = "python3"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("notebook_run")
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run),
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(run), "--trainer.logger.name", "logs",
                 "--trainer.callbacks+=codiemb_pl.callbacks.TrainingMonitor",
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                 "--trainer.callbacks.dirpath", str(run / "model")])
    assert code == 0
    board = {"metric": "val/avg", "winner": "delta_guided",
             "ranking": [{"name": "delta_guided", "kind": "fused", "method": "delta_guided",
                          "params": {"weights": [0.4, 0.6]}, "metrics": {"val/avg": 0.3, "val/ir_avg": 0.2}},
                         {"name": "last", "kind": "checkpoint", "method": "", "params": {}, "metrics": {"val/avg": 0.1}}]}
    (run / "fusion").mkdir()
    (run / "fusion" / "leaderboard.json").write_text(json.dumps(board))
    return run


def execute(name: str, workdir: Path):
    """Run a notebook top to bottom (raises on the first failing cell); returns it with outputs."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 Jupyter kernel (python -m ipykernel install --user)")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def text_output(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(value) for key, value in output.get("data", {}).items() if key == "text/plain")
    return "\n".join(parts)


def test_quickstart_notebook_loads_encodes_and_retrieves(tiny_run, monkeypatch):
    monkeypatch.setenv("CODIEMB_MODEL_DIR", str(tiny_run / "model"))
    out = text_output(execute("quickstart.ipynb", NOTEBOOKS))
    assert "embeddings: (3, 32)" in out  # the tiny model's width
    assert out.count("query: ") == 3 and "CoDiEmb text encoder" in out


def test_analysis_notebook_reads_curves_leaderboard_weights_and_geometry(tiny_run, monkeypatch):
    monkeypatch.setenv("CODIEMB_RUN_DIR", str(tiny_run))
    out = text_output(execute("analysis.ipynb", NOTEBOOKS))
    assert "curves from" in out and "metrics.csv" in out
    assert "'loss per task': 2" in out and "'optimisation': 2" in out and "'IR in-batch diagnostics': 3" in out
    assert "winner: delta_guided" in out and "fusion weights: {'delta_guided': [0.4, 0.6]}" in out
    assert "svd_entropy" in out and "uniformity" in out
