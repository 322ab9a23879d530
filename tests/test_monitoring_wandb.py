"""W&B dashboards: an offline W&B run of a tiny fit, read back from its `.wandb` transaction log."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

from codiemb_pl.callbacks.monitoring import (
    batch_sizes_by_task,
    global_grad_norm,
    log_leaderboard,
    log_weight_histograms,
)
from codiemb_pl.cli.main import main

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
WANDB_CONFIG = REPO_ROOT / "configs" / "logger" / "wandb.yaml"
_BLOCK = 32768  # the .wandb log is a LevelDB-style log: 32 KiB blocks of (crc, length, type) chunks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Yield the protobuf `Record`s of an offline run's `.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < 7:
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload = pending + chunk
        else:  # zero padding at the end of a block
            position += left_in_block - 7 - length
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_offline_run(save_dir: Path) -> tuple[dict, list[dict], Path]:
    """(config, history rows, run folder) of the single offline run under `save_dir`."""
    run_files = list(save_dir.rglob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    # wandb's service process may still be writing the log after finish(): wait for its exit record
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            record.WhichOneof("record_type") == "exit" for record in wandb_records(run_files[0])):
        time.sleep(0.5)
    config, history = {}, []
    for record in wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return config, history, run_files[0].parent


@pytest.fixture(scope="module")
def offline_wandb_fit(tiny_model_dir, tmp_path_factory):
    assert os.environ.get("WANDB_MODE") == "offline"
    import wandb

    run = tmp_path_factory.mktemp("wandb_fit")
    code = main(["fit", "--config", str(TINY_CONFIG), "--config", str(WANDB_CONFIG),
                 "--model.model_name_or_path", str(tiny_model_dir), "--trainer.default_root_dir", str(run),
                 "--trainer.logger.init_args.save_dir", str(run / "wandb"),
                 "--trainer.max_steps", "6"])
    wandb.finish()
    assert code == 0
    return read_offline_run(run / "wandb")


def test_the_wandb_config_keeps_the_other_configs_callbacks(offline_wandb_fit):
    config, _, _ = offline_wandb_fit
    callbacks = [c["class_path"] for c in config["cli"]["trainer"]["callbacks"]]
    assert callbacks == ["lightning.pytorch.callbacks.ModelCheckpoint", "codiemb_pl.callbacks.TrainingMonitor"]


def test_offline_run_holds_the_resolved_config_and_every_dashboard_key(offline_wandb_fit):
    config, history, _ = offline_wandb_fit
    cli = config["cli"]
    assert cli["model"]["ir_temperature"] == 0.05 and cli["data"]["ir_batch_size"] == 4
    assert cli["trainer"]["max_steps"] == 6 and cli["data"]["train"][0]["name"] == "demo_ir"
    keys = set().union(*history)
    expected = {
        "train/loss", "train/ir/loss", "train/sts/loss", "train/ir/demo_ir/loss", "train/sts/demo_sts/loss",
        "train/sts/pearson", "train/sts/rank_kl", "train/sts/pro", "train/sts/mid_nce",
        "train/ir/accuracy", "train/ir/mean_rank_of_positive", "train/ir/margin",
        "train/ir/optimizer_steps", "train/sts/optimizer_steps",
        "train/ir/global_samples_seen", "train/sts/global_samples_seen",
        "train/lr", "train/grad_norm",
        "val/demo_sts_dev/cosine_spearman", "val/demo_sts_dev/cosine_pearson", "val/demo_ir_dev/ndcg_at_10",
        "val/demo_ir_dev/mrr_at_10", "val/demo_ir_dev/recall_at_100", "val/demo_ir_dev/map_at_100",
        "val/ir_avg", "val/sts_avg", "val/avg",
    }
    assert expected <= keys, sorted(expected - keys)


def test_per_task_counters_add_up(offline_wandb_fit):
    _, history, _ = offline_wandb_fit
    last = {}
    for row in history:
        last.update({k: v for k, v in row.items() if k.startswith("train/")})
    assert last["train/ir/optimizer_steps"] + last["train/sts/optimizer_steps"] == 6
    assert last["train/ir/global_samples_seen"] == 4 * last["train/ir/optimizer_steps"]  # batch 4, 1 device
    assert last["train/sts/global_samples_seen"] == 4 * last["train/sts/optimizer_steps"]
    assert all(row["train/grad_norm"] > 0 for row in history if "train/grad_norm" in row)
    assert all(0 < row["train/lr"] <= 1e-4 for row in history if "train/lr" in row)


def test_leaderboard_and_weight_histograms_reach_an_offline_run(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")   # put back after: WandbLogger(offline=True) sets it to "dryrun"
    logger = WandbLogger(project="codiemb-test", save_dir=str(tmp_path), offline=True)
    rows = [{"method": "delta_guided", "val/avg": 0.61, "weights": [0.5, 0.5]},
            {"method": "uniform_soup", "val/avg": 0.58}]
    assert log_leaderboard([logger], rows)
    assert log_weight_histograms([logger], {"encoder.layer.0": torch.tensor([0.2, 0.3, 0.5])})
    wandb.finish()
    _, history, run_dir = read_offline_run(tmp_path)
    keys = set().union(*history)
    assert "fusion/leaderboard/_type" in keys and "fusion/weights/encoder.layer.0/bins" in keys
    table_file = next(run_dir.rglob("leaderboard*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["method", "val/avg", "weights"]
    assert table["data"][0][:2] == ["delta_guided", 0.61] and table["data"][1][2] is None


def test_helpers_do_nothing_without_wandb():
    from lightning.pytorch.loggers import CSVLogger

    assert log_leaderboard(None, [{"method": "x"}]) is False
    assert log_leaderboard([CSVLogger("unused")], [{"method": "x"}]) is False
    assert log_weight_histograms([], {"w": [1.0]}) is False


def test_batch_sizes_and_gradient_norm():
    ir = {"task": "ir", "query": {"input_ids": torch.zeros(3, 5)}}
    sts = {"task": "sts", "scores": torch.zeros(2)}
    assert batch_sizes_by_task(ir) == {"ir": 3} and batch_sizes_by_task(sts) == {"sts": 2}
    assert batch_sizes_by_task({"task": "mixed", "ir": ir, "sts": None}) == {"ir": 3}
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert global_grad_norm([a, b, torch.nn.Parameter(torch.zeros(1))]) == pytest.approx(5.0)
