"""benchmarks/paired_comparison.py: the paired bootstrap of a metric difference, on hand-made items."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import paired_comparison  # noqa: E402

from codiemb_pl.data.eval_sets import EvalSet  # noqa: E402


def ir_set() -> EvalSet:
    return EvalSet(name="ir", task="ir", texts={"query": [], "corpus": []})


def sts_set(gold: list[float]) -> EvalSet:
    return EvalSet(name="sts", task="sts", texts={"text1": [], "text2": []}, gold=gold)


def test_ir_constant_gain_gives_that_difference_in_every_resample():
    b = torch.tensor([0.2, 0.5, 0.9, 0.0, 0.4], dtype=torch.float64)
    result = paired_comparison.paired_bootstrap(ir_set(), b + 0.1, b, resamples=200, seed=0)
    assert result["difference"] == pytest.approx(10.0)
    assert result["ci_low"] == pytest.approx(10.0) and result["ci_high"] == pytest.approx(10.0)
    assert result["p_a_wins"] == 1.0 and result["items"] == 5
    assert result["a"] == pytest.approx(100 * float((b + 0.1).mean()))
    sd = 100 * float((b + 0.1).std())  # unbiased sample sd, as torch.std
    assert result["per_query_sd"] == pytest.approx(sd) and result["standard_error"] == pytest.approx(sd / 5 ** 0.5)


def test_identical_models_differ_by_zero_and_never_win():
    gold = [0.1, 0.4, 0.35, 0.8, 0.6, 0.9]
    cosines = torch.tensor([0.2, 0.3, 0.5, 0.7, 0.6, 0.95], dtype=torch.float64)
    result = paired_comparison.paired_bootstrap(sts_set(gold), cosines, cosines.clone(), resamples=100, seed=1)
    assert result["difference"] == 0.0 and result["ci_low"] == 0.0 and result["ci_high"] == 0.0
    assert result["p_a_wins"] == 0.0 and "per_query_sd" not in result


def test_sts_metric_is_spearman_and_the_interval_brackets_the_difference():
    gold = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.5]
    a = torch.tensor(gold, dtype=torch.float64) + torch.tensor([0, 0, 0, 0, 0, 0, 0.05, -0.05], dtype=torch.float64)
    b = torch.tensor([0.3, 0.1, 0.5, 0.2, 0.9, 0.7, 0.6, 0.4], dtype=torch.float64)
    result = paired_comparison.paired_bootstrap(sts_set(gold), a, b, resamples=500, seed=2)
    from codiemb_pl.evaluation.sts import spearman

    gold_t = torch.tensor(gold, dtype=torch.float64)
    assert result["a"] == pytest.approx(100 * spearman(a, gold_t))
    assert result["b"] == pytest.approx(100 * spearman(b, gold_t))
    assert result["ci_low"] <= result["difference"] <= result["ci_high"]
    assert result["p_a_wins"] > 0.9  # a orders the pairs almost perfectly, b does not
