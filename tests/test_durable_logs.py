"""The CSV logger's files survive a kill: `metrics.csv` and `hparams.yaml` hold what was written before, never a
truncated file. Lightning's writer truncates `metrics.csv` to rewrite it whenever a new metric appears (and
appends rows in place), and writes `hparams.yaml` in place: a run killed there lost every row logged before.

A kill is simulated by stopping the write half-way with a BaseException (SIGKILL gives no chance to clean up).
"""

from __future__ import annotations

import csv

import pytest
import yaml

from codiemb_pl.training.loggers import CSVLogger


class Killed(BaseException):
    """The process died here."""


def rows_of(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_logged_before_survive_a_kill_during_the_rewrite_for_a_new_metric(tmp_path, monkeypatch):
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version=0)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.save()
    path = tmp_path / "logs" / "version_0" / "metrics.csv"
    before = rows_of(path)
    assert [row["step"] for row in before] == ["0", "1", "2"]

    real_writerows = csv.DictWriter.writerows

    def half_then_killed(self, rows):
        rows = list(rows)
        real_writerows(self, rows[: len(rows) // 2])
        raise Killed

    logger.log_metrics({"train/loss": 0.2, "val/avg": 0.5}, step=3)   # a new metric: the file gets a new header
    monkeypatch.setattr(csv.DictWriter, "writerows", half_then_killed)
    with pytest.raises(Killed):
        logger.save()
    monkeypatch.undo()
    assert rows_of(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]


def test_metrics_are_appended_across_saves_with_a_header_for_every_metric(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version=0)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    logger.log_metrics({"train/loss": 0.5, "val/avg": 0.25}, step=1)
    logger.save()
    logger.log_metrics({"train/loss": 0.25}, step=2)
    logger.save()
    rows = rows_of(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert rows == [{"step": "0", "train/loss": "1.0", "val/avg": ""},
                    {"step": "1", "train/loss": "0.5", "val/avg": "0.25"},
                    {"step": "2", "train/loss": "0.25", "val/avg": ""}]


def test_hparams_yaml_keeps_its_previous_content_when_a_write_is_killed(tmp_path, monkeypatch):
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version=0)
    logger.log_hyperparams({"lr": 0.001})
    path = tmp_path / "logs" / "version_0" / "hparams.yaml"
    assert yaml.safe_load(path.read_text()) == {"lr": 0.001}
    real_dump = yaml.dump

    def dump_half_then_killed(data, stream=None, **kwargs):
        if stream is None:
            return real_dump(data, **kwargs)
        text = real_dump(data, **kwargs)
        stream.write(text[: len(text) // 2])
        stream.flush()
        raise Killed

    monkeypatch.setattr(yaml, "dump", dump_half_then_killed)
    with pytest.raises(Killed):
        logger.log_hyperparams({"lr": 0.001, "batch_size": 32, "name": "a run with a long name" * 4})
    monkeypatch.undo()
    assert yaml.safe_load(path.read_text()) == {"lr": 0.001}
    assert sorted(p.name for p in path.parent.iterdir()) == ["hparams.yaml"]
