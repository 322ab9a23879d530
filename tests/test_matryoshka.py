"""Matryoshka training (`losses/matryoshka.py`, `model.matryoshka_dims`): the objectives at each width against
losses computed by hand on re-normalised prefixes, the weighted sum, MidNCE once, the full width as plain
training, the module's settings, validation keys at every trained width and checkpoint selection by one."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.losses.matryoshka import matryoshka_widths, over_widths
from codiemb_pl.losses.objectives import CoDiEmbSTSObjective, CoSENTObjective, IRObjective, STSInfoNCEObjective
from codiemb_pl.losses.sts import STSLossConfig
from codiemb_pl.model.widths import check_dims, metric_key, split_metric_key, truncate

WIDTHS = matryoshka_widths([8, 2, 4], [1.0, 0.25, 0.5], embedding_dim=8)   # given unsorted on purpose


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def hand_prefix(rows: torch.Tensor, dim: int) -> list[list[float]]:
    """e[:m] / sqrt(Σ e_k²) row by row, in plain Python."""
    out = []
    for row in rows.tolist():
        part = row[:dim]
        norm = math.sqrt(sum(x * x for x in part))
        out.append([x / norm for x in part])
    return out


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def hand_info_nce(queries: list[list[float]], positives: list[list[float]], tau: float) -> float:
    """1/b Σ_i −log(exp(q_i·d_i/τ) / Σ_j exp(q_i·d_j/τ)): one positive each, in-batch negatives only."""
    total = 0.0
    for i, query in enumerate(queries):
        logits = [dot(query, doc) / tau for doc in positives]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return total / len(queries)


def test_widths_are_checked_and_sorted_largest_first():
    assert WIDTHS.dims == (8, 4, 2) and WIDTHS.weights == (1.0, 0.5, 0.25)
    assert matryoshka_widths([8, 4], embedding_dim=8).weights == (1.0, 1.0)
    assert matryoshka_widths(None) is None and matryoshka_widths([]) is None
    for dims, weights, problem in (([8, 9], None, "out of range"), ([4, 4], None, "twice"), ([0], None, "out of range"),
                                   ([8, 4], [1.0], "2 widths"), ([8, 4], [1.0, -1.0], "negative"),
                                   ([8, 4], [0.0, 0.0], "only zeros"), (None, [1.0], "without"),
                                   ("64", None, "list of integers")):
        with pytest.raises(InputError, match=problem):
            matryoshka_widths(dims, weights, embedding_dim=8)


def test_prefix_is_renormalised_and_the_full_width_is_untouched():
    rows = unit(3, 8, seed=1)
    torch.testing.assert_close(truncate(rows, 4), torch.tensor(hand_prefix(rows, 4), dtype=torch.float64))
    assert truncate(rows, 8) is rows and truncate(rows, None) is rows
    torch.testing.assert_close(truncate(rows, 4, renormalize=False), rows[:, :4])


def test_metric_keys_round_trip():
    assert metric_key("val/stsb/cosine_spearman", 64) == "val/stsb/cosine_spearman@64"
    assert metric_key("ndcg_at_10", 128, "int8") == "ndcg_at_10@128:int8"
    assert metric_key("avg", None, "binary") == "avg:binary" and metric_key("avg") == "avg"
    for key in ("val/avg", "val/stsb/cosine_spearman@64", "ndcg_at_10@128:int8", "avg:binary"):
        assert metric_key(*split_metric_key(key)) == key
    assert check_dims([64, 384, 128], "x") == [384, 128, 64]


def test_ir_objective_at_each_width_equals_info_nce_of_renormalised_prefixes_by_hand():
    queries, docs, tau = unit(4, 8, seed=2), unit(4, 8, seed=3), 0.1
    objective = IRObjective(temperature=tau, widths=WIDTHS)
    loss, logs = objective.score({"query": queries, "positives": docs}, {"dataset": "d"})
    expected = {dim: hand_info_nce(hand_prefix(queries, dim), hand_prefix(docs, dim), tau) for dim in (8, 4, 2)}
    for dim, value in expected.items():
        assert float(logs[f"loss@{dim}"]) == pytest.approx(value, rel=1e-10)
    assert len({round(v, 6) for v in expected.values()}) == 3   # the widths really score differently
    total = 1.0 * expected[8] + 0.5 * expected[4] + 0.25 * expected[2]
    assert float(loss) == pytest.approx(total, rel=1e-10)
    assert float(logs["loss"]) == float(logs["d/loss"]) == pytest.approx(total, rel=1e-10)


def test_pearson_sts_objective_at_each_width_by_hand():
    emb1, emb2 = unit(6, 8, seed=4), unit(6, 8, seed=5)
    scores = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.2, 0.5], dtype=torch.float64)
    config = STSLossConfig(pearson=1.0, rank_kl=0.0, pro=0.0, mid_nce=0.0)
    loss, logs = CoDiEmbSTSObjective(config, widths=WIDTHS).score({"text1": emb1, "text2": emb2}, {"scores": scores})

    def one_minus_pearson(dim: int) -> float:
        p = [dot(a, b) for a, b in zip(hand_prefix(emb1, dim), hand_prefix(emb2, dim))]
        y = scores.tolist()
        mp, my = sum(p) / len(p), sum(y) / len(y)
        cov = sum((a - mp) * (b - my) for a, b in zip(p, y)) / len(p)
        var_p, var_y = sum((a - mp) ** 2 for a in p) / len(p), sum((b - my) ** 2 for b in y) / len(y)
        return 1.0 - cov / math.sqrt((var_p + 1e-8) * (var_y + 1e-8))

    expected = {dim: one_minus_pearson(dim) for dim in (8, 4, 2)}
    for dim, value in expected.items():
        assert float(logs[f"loss@{dim}"]) == pytest.approx(value, rel=1e-9)
    assert float(loss) == pytest.approx(expected[8] + 0.5 * expected[4] + 0.25 * expected[2], rel=1e-9)
    assert float(logs["pearson"]) == pytest.approx(expected[8], rel=1e-9)   # components: the largest width


def test_midnce_enters_once_with_the_largest_width():
    emb1, emb2, mid1, mid2 = (unit(4, 8, seed=s) for s in (6, 7, 8, 9))
    scores = torch.tensor([0.9, 1.0, 0.85, 0.95], dtype=torch.float64)
    config = STSLossConfig(pearson=0.0, rank_kl=0.0, pro=0.0, mid_nce=1.0)
    objective = CoDiEmbSTSObjective(config, widths=WIDTHS)
    loss, logs = objective.score({"text1": (emb1, mid1), "text2": (emb2, mid2)}, {"scores": scores})
    assert float(logs["loss@8"]) > 0 and float(logs["loss@4"]) == 0.0 == float(logs["loss@2"])
    assert float(loss) == pytest.approx(float(logs["mid_nce"]))


def test_cosent_and_sts_infonce_follow_the_same_rule():
    emb1, emb2 = unit(5, 8, seed=10), unit(5, 8, seed=11)
    scores = torch.tensor([0.9, 0.1, 0.85, 0.4, 0.95], dtype=torch.float64)
    for plain, wide in ((CoSENTObjective(), CoSENTObjective(widths=WIDTHS)),
                        (STSInfoNCEObjective(0.05, 0.8), STSInfoNCEObjective(0.05, 0.8, widths=WIDTHS))):
        loss, logs = wide.score({"text1": emb1, "text2": emb2}, {"scores": scores})
        at = {dim: plain.score({"text1": truncate(emb1, dim), "text2": truncate(emb2, dim)}, {"scores": scores})[0]
              for dim in (8, 4, 2)}
        for dim, value in at.items():
            torch.testing.assert_close(logs[f"loss@{dim}"], value)
        torch.testing.assert_close(loss, at[8] + 0.5 * at[4] + 0.25 * at[2])


def test_cross_device_gathers_run_once_at_full_width(monkeypatch):
    """IR gathers positives and negatives once (full width), STS one [b, k] matrix of the widths' predictions."""
    from codiemb_pl.losses import objectives

    gathered = []

    def fake_gather(x):   # rank 0 of 2 ranks holding the same block
        gathered.append(tuple(x.shape))
        return torch.cat([x, x])

    monkeypatch.setattr(objectives, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(objectives, "gather_with_grad", fake_gather)
    monkeypatch.setattr(objectives, "gather_no_grad", lambda x: None if x is None else torch.cat([x, x]))
    monkeypatch.setattr(objectives, "pad_negatives_to_every_ranks_count", lambda p, n, m, i: (n, m, i))
    queries, positives, negatives = unit(3, 8, seed=14), unit(3, 8, seed=15), unit(6, 8, seed=16)
    IRObjective(widths=WIDTHS).score({"query": queries, "positives": positives, "negatives": negatives}, {})
    assert gathered == [(3, 1, 8), (3, 2, 8)]
    gathered.clear()
    CoDiEmbSTSObjective(STSLossConfig(mid_nce=0.0), gather=True, widths=WIDTHS).score(
        {"text1": unit(4, 8, seed=17), "text2": unit(4, 8, seed=18)}, {"scores": torch.rand(4, dtype=torch.float64)})
    assert gathered == [(4, 3)]


def test_the_full_width_alone_is_plain_training_loss_and_gradient():
    queries, docs = unit(4, 8, seed=12).requires_grad_(), unit(4, 8, seed=13)
    full = matryoshka_widths([8], embedding_dim=8)
    plain = IRObjective(temperature=0.05).score({"query": queries, "positives": docs}, {})[0]
    (plain_grad,) = torch.autograd.grad(plain, queries)
    wide = IRObjective(temperature=0.05, widths=full).score({"query": queries, "positives": docs}, {})[0]
    (wide_grad,) = torch.autograd.grad(wide, queries)
    assert torch.equal(plain, wide) and torch.equal(plain_grad, wide_grad)


def test_over_widths_without_widths_is_the_loss_itself():
    value = torch.tensor(2.0)
    assert over_widths(lambda dim: value if dim is None else None, None) == (value, {})


# -- through the CLI: a tiny fit with widths, validation at every width, selection and fusion by one ----------------
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
TEXTS = ["a cat sat on the mat", "stock markets fell sharply", "the weather is lovely today"]


@pytest.fixture(scope="module")
def matryoshka_run(tiny_model_dir, tmp_path_factory) -> Path:
    """4 steps with widths [32, 16, 8]; validation at steps 2 and 4; checkpoints chosen by `val/avg@8`, the fusion
    leaderboard ranked by `val/sts_avg@16`; an ExportEncoder folder; a CSV log."""
    run = tmp_path_factory.mktemp("matryoshka_run")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trainer"].update(val_check_interval=2, logger={
        "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}})
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/avg@8", "mode": "max", "save_top_k": 1}},
        {"class_path": "codiemb_pl.callbacks.ExportEncoder", "init_args": {"dirpath": str(run / "model")}},
        {"class_path": "codiemb_pl.callbacks.CheckpointFusion",
         "init_args": {"metric": "val/sts_avg@16", "every_n_steps": 2, "collect": ["last"],
                       "methods": [{"method": "uniform_soup"}]}}]
    config["model"].update(model_name_or_path=str(tiny_model_dir), matryoshka_dims=[32, 16, 8])
    (run / "fit.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(run / "fit.yaml"), "--trainer.default_root_dir", str(run)]) == 0
    return run


def logged(run: Path) -> list[dict[str, float]]:
    return [{key: float(value) for key, value in row.items() if value}
            for row in csv.DictReader(next(run.rglob("metrics.csv")).open())]


def test_training_logs_each_width_and_validation_adds_the_smaller_ones(matryoshka_run):
    rows = logged(matryoshka_run)
    keys = {key for row in rows for key in row}
    assert {"train/ir/loss@32", "train/ir/loss@16", "train/ir/loss@8", "train/sts/loss@8"} <= keys
    for width in ("", "@16", "@8"):   # today's keys at full width, `@m` for the smaller trained widths
        assert {f"val/demo_sts_dev/cosine_spearman{width}", f"val/demo_ir_dev/ndcg_at_10{width}",
                f"val/demo_ir_dev/recall_at_100{width}", f"val/avg{width}", f"val/ir_avg{width}"} <= keys
    assert not any(key.endswith("@32") for key in keys if key.startswith("val/"))
    step = next(row for row in rows if "train/ir/loss@32" in row)
    expected = step["train/ir/loss@32"] + step["train/ir/loss@16"] + step["train/ir/loss@8"]   # weights 1
    assert step["train/ir/loss"] == pytest.approx(expected, rel=1e-5)
    validations = [row for row in rows if "val/avg@8" in row]
    assert len(validations) == 2
    assert any(row["val/avg@8"] != row["val/avg"] for row in validations)


def test_checkpoint_selection_targets_a_width(matryoshka_run):
    rows = [row for row in logged(matryoshka_run) if "val/avg@8" in row]
    best = max(rows, key=lambda row: row["val/avg@8"])
    (checkpoint,) = (matryoshka_run / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved = next(value for key, value in state["callbacks"].items() if key.startswith("ModelCheckpoint"))
    assert saved["monitor"] == "val/avg@8"
    assert float(saved["best_model_score"]) == pytest.approx(best["val/avg@8"], rel=1e-6)
    assert state["global_step"] == best["step"] + 1


def test_the_fusion_leaderboard_ranks_by_a_width_and_keeps_the_record(matryoshka_run):
    board = json.loads((matryoshka_run / "fusion" / "leaderboard.json").read_text())
    assert board["metric"] == "val/sts_avg@16"
    assert all("val/sts_avg@16" in row["metrics"] and "val/avg@8" in row["metrics"] for row in board["ranking"])
    config = json.loads((matryoshka_run / "fusion" / "model" / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == [32, 16, 8]


def test_export_records_the_widths_and_loads_in_sentence_transformers_with_truncate_dim(matryoshka_run):
    from sentence_transformers import SentenceTransformer

    from codiemb_pl.model.encoder import TextEncoder

    folder = matryoshka_run / "model"
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == [32, 16, 8] and "truncate_dim" not in config   # loads at full width
    card = (folder / "README.md").read_text()
    assert "| Matryoshka widths (trained) | 32, 16, 8 |" in card and "truncate_dim=8" in card
    encoder = TextEncoder.load(folder)
    assert encoder.matryoshka_dims == [32, 16, 8]
    ours = encoder.encode(TEXTS)
    for dim in (16, 8):
        theirs = SentenceTransformer(str(folder), device="cpu", truncate_dim=dim).encode(TEXTS, convert_to_tensor=True)
        assert theirs.shape == (3, dim)
        torch.testing.assert_close(theirs, ours[:, :dim], rtol=0, atol=1e-5)
        normalised = SentenceTransformer(str(folder), device="cpu", truncate_dim=dim).encode(
            TEXTS, convert_to_tensor=True, normalize_embeddings=True)
        torch.testing.assert_close(normalised, truncate(ours, dim), rtol=0, atol=1e-5)


def test_a_metric_at_an_untrained_width_is_one_clear_line():
    from codiemb_pl.workflows.fusion.settings import check_metric

    tasks = {"stsb": "sts", "scifact": "ir"}
    check_metric("val/scifact/ndcg_at_10@64", tasks, "fusion.metric", dims=[128, 64])
    with pytest.raises(InputError, match=r"'val/avg@32': validation scores no width 32 .*trained: 128, 64\) "
                                         r"\(use val/avg \(full width\) or val/avg@128 or val/avg@64\)"):
        check_metric("val/avg@32", tasks, "fusion.metric", dims=[128, 64])
    with pytest.raises(InputError, match=r"did you mean val/stsb/cosine_spearman@64\?"):
        check_metric("val/stsb/spearman@64", tasks, "fusion.metric", dims=[128, 64])


def test_codiemb_fuse_records_the_widths_its_members_share(tiny_model_dir, tmp_path):
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.workflows.fusion.fuse import fuse

    members = []
    for name, dims, shift in (("a", [32, 16, 8], 1e-3), ("b", [32, 8], -1e-3), ("plain", [], 2e-3)):
        encoder = TextEncoder(str(tiny_model_dir))
        with torch.no_grad():
            next(encoder.model.parameters()).add_(shift)   # a fine-tuned copy of the base
        encoder.matryoshka_dims = dims
        encoder.save(tmp_path / name)
        members.append(tmp_path / name)

    def fused_record(paths, output):
        notes = []
        fuse(tiny_model_dir, [{"path": str(p)} for p in paths], "uniform_soup", tmp_path / output,
             template=str(members[0]), log=notes.append)
        config = json.loads((tmp_path / output / "config_sentence_transformers.json").read_text())
        return config.get("matryoshka_dims"), notes

    assert fused_record(members[:1], "one") == ([32, 16, 8], [])
    dims, notes = fused_record(members[:2], "two")
    assert dims == [32, 8] and len(notes) == 1 and "records the widths all of them share, [32, 8]" in notes[0]
    dims, notes = fused_record(members, "three")
    assert dims is None and "plain: none" in notes[0]
    assert TextEncoder.load(tmp_path / "three").matryoshka_dims == []
