"""The module's plain parts: LR schedule, length-bucketed encoding, metric summaries, routing."""

from __future__ import annotations

import pytest
import torch

from codiemb_pl.evaluation.suite import summary_metrics
from codiemb_pl.evaluation.tables import comparison_table, format_metrics_table
from codiemb_pl.model.bucketing import encode_in_length_buckets
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.training.module import linear_warmup_decay


def test_linear_warmup_decay_by_hand():
    # 10 steps, 2 warm-up: 0.5, 1.0, then (10-s)/8
    values = [linear_warmup_decay(s, 10, 2) for s in range(11)]
    assert values[:2] == [0.5, 1.0]
    assert values[2:] == pytest.approx([8 / 8, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0])
    assert linear_warmup_decay(0, 5, 0) == 1.0


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    encoder = TextEncoder(str(tiny_model_dir))
    encoder.eval()
    return encoder


@pytest.mark.parametrize("buckets", [1, 2, 3, 7])
def test_length_buckets_change_nothing_but_padding(tiny_encoder, buckets):
    texts = ["a", "a much longer sentence with many more tokens in it", "mid length text here", "x y",
             "another fairly long sentence for the bucket test", "short"]
    features = tiny_encoder.tokenize(texts)
    whole = tiny_encoder(features)
    bucketed = encode_in_length_buckets(tiny_encoder, features, buckets)
    assert torch.allclose(whole, bucketed, atol=1e-5)
    final, middle = encode_in_length_buckets(lambda f: tiny_encoder(f, return_middle=True), features, buckets)
    ref_final, ref_middle = tiny_encoder(features, return_middle=True)
    assert torch.allclose(final, ref_final, atol=1e-5) and torch.allclose(middle, ref_middle, atol=1e-5)


def test_length_buckets_pass_gradients(tiny_encoder):
    features = tiny_encoder.tokenize(["one two three four", "five", "six seven"])
    tiny_encoder.zero_grad()
    tiny_encoder(features).sum().backward()
    reference = [p.grad.clone() for p in tiny_encoder.parameters() if p.grad is not None]
    tiny_encoder.zero_grad()
    encode_in_length_buckets(tiny_encoder, features, 2).sum().backward()
    bucketed = [p.grad for p in tiny_encoder.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(reference, bucketed))


def test_summary_metrics_average_headlines_per_task():
    per_set = {"a": {"ndcg_at_10": 0.5, "mrr_at_10": 0.9}, "b": {"ndcg_at_10": 0.7},
               "c": {"cosine_spearman": 0.8, "cosine_pearson": 0.1}}
    summary = summary_metrics(per_set, {"a": "ir", "b": "ir", "c": "sts"})
    assert summary == pytest.approx({"ir_avg": 0.6, "sts_avg": 0.8, "avg": 0.7})
    assert summary_metrics({"c": per_set["c"]}, {"c": "sts"}) == pytest.approx({"sts_avg": 0.8, "avg": 0.8})


def test_tables_show_every_value():
    table = format_metrics_table({"s": {"cosine_spearman": 0.81234}}, {"avg": 0.81234}, title="t")
    assert "0.8123" in table and table.splitlines()[0] == "t"
    comparison = comparison_table([("start", {"val/avg": 0.5}), ("exported", {"val/avg": 0.625})])
    assert "start" in comparison and "0.5000" in comparison and "0.6250" in comparison
