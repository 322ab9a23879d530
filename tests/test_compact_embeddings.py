"""Compact embeddings (`evaluation.compact`, `evaluation.variants`): int8 and binary against small cases computed
by hand and against sentence-transformers' `quantize_embeddings`, binary retrieval's Hamming shortlist rescored
with the float query, scores at a width, and the widths / precisions of `codiemb evaluate`, `codiemb predict`
and the MTEB adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codiemb_pl.cli.main import main
from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.data.records import IRCorpus, STSRecord
from codiemb_pl.evaluation.compact import (binary_rescored_ranking, bytes_per_vector, hamming_distances, int8_ranges,
                                           quantize_binary, quantize_int8, unpack_signs)
from codiemb_pl.evaluation.suite import score_set, summary_metrics
from codiemb_pl.evaluation.sts import sts_metrics
from codiemb_pl.evaluation.variants import calibration_ranges, score_variant, variant_metrics
from codiemb_pl.model.widths import truncate

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


def approx(metrics: dict[str, float]):
    return pytest.approx(metrics, abs=1e-6)


TEXTS = ["a short text", "a somewhat longer text about retrieval and similarity", "third"]


def test_int8_codes_by_hand():
    ranges = int8_ranges(torch.tensor([[-1.0, 0.0, 3.0], [1.0, 2.0, 3.0]]))
    assert ranges.tolist() == [[-1.0, 0.0, 3.0], [1.0, 2.0, 3.0]]
    # steps 2/255, 2/255 and 1 (a constant dimension); q = clip(floor((x - lo) / step), 0, 255) - 128
    codes = quantize_int8(torch.tensor([[0.0, 0.5, 3.0], [2.0, -1.0, 4.5]]), ranges)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[127 - 128, 63 - 128, 0 - 128], [255 - 128, 0 - 128, 1 - 128]]   # 127.5, 63.75; 382, -127.5


def test_int8_equals_sentence_transformers_quantize_embeddings():
    from sentence_transformers.util import quantize_embeddings

    generator = torch.Generator().manual_seed(0)
    calibration, embeddings = torch.randn(50, 16, generator=generator), torch.randn(20, 16, generator=generator)
    theirs = quantize_embeddings(embeddings.numpy(), "int8", calibration_embeddings=calibration.numpy())
    assert np.array_equal(quantize_int8(embeddings, int8_ranges(calibration)).numpy(), theirs)


def test_binary_bits_by_hand_and_as_sentence_transformers_packs_them():
    from sentence_transformers.util import quantize_embeddings

    row = torch.tensor([[0.5, -1.0, 0.0, 2.0, -0.1, 3.0, 1.0, -2.0, 0.3]])
    packed = quantize_binary(row)   # bits 1 0 0 1 0 1 1 0 | 1 (padded with zeros)
    assert packed.tolist() == [[0b10010110, 0b10000000]]
    assert np.array_equal(packed.numpy(), quantize_embeddings(row.numpy(), "ubinary"))
    assert np.array_equal(packed.numpy().astype(np.int16) - 128, quantize_embeddings(row.numpy(), "binary"))
    assert unpack_signs(packed, 9).tolist() == [[1, -1, -1, 1, -1, 1, 1, -1, 1]]
    other = quantize_binary(torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0]]))
    assert hamming_distances(packed, other, 9).tolist() == [[3]]   # positions 2, 5 and 9 differ


def test_binary_retrieval_shortlists_by_hamming_and_rescores_with_the_float_query():
    query = torch.tensor([[0.9, 0.1, -0.5, 0.2]])                  # bits 1 1 0 1
    corpus = quantize_binary(torch.tensor([[1.0, 1, -1, 1],        # H 0, q·s = 1.7
                                           [1, -1, -1, 1],         # H 1, q·s = 1.5
                                           [-1, 1, -1, 1],         # H 1, q·s = -0.1
                                           [-1, -1, 1, -1],        # H 4
                                           [1, 1, 1, 1]]))         # H 1, q·s = 0.7
    # Hamming order (ties: lower index first) 0, 1, 2, 4, 3; the first `rescore_depth` re-sorted by q·s
    assert binary_rescored_ranking(query, corpus, 4, top_k=5, rescore_depth=4).tolist() == [[0, 1, 4, 2, 3]]
    assert binary_rescored_ranking(query, corpus, 4, top_k=5, rescore_depth=2).tolist() == [[0, 1, 2, 4, 3]]
    assert binary_rescored_ranking(query, corpus, 4, top_k=3, rescore_depth=40).tolist() == [[0, 1, 4]]


def test_bytes_per_vector():
    assert [bytes_per_vector(384, p) for p in ("float32", "int8", "binary")] == [1536, 384, 48]
    assert bytes_per_vector(20, "binary") == 3


def sts_set() -> tuple[EvalSet, dict[str, torch.Tensor]]:
    pairs = [STSRecord(f"a{i}", f"b{i}", score) for i, score in enumerate([0.1, 0.9, 0.4, 0.7, 0.3, 0.6])]
    generator = torch.Generator().manual_seed(1)
    return EvalSet.from_sts("s", pairs), {name: F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
                                          for name in ("text1", "text2")}


def ir_set() -> tuple[EvalSet, dict[str, torch.Tensor]]:
    corpus = IRCorpus(queries={f"q{i}": f"query {i}" for i in range(4)}, corpus={f"d{i}": f"doc {i}" for i in range(6)},
                      qrels={"q0": {"d0": 1}, "q1": {"d3": 1}, "q2": {"d5": 1, "d1": 1}, "q3": {"d2": 1}})
    generator = torch.Generator().manual_seed(2)
    return EvalSet.from_ir("r", corpus), {"query": torch.randn(4, 16, generator=generator),
                                          "corpus": torch.randn(6, 16, generator=generator)}


def test_variants_score_the_prefix_its_int8_codes_and_its_signs():
    vset, embeddings = sts_set()
    gold = torch.tensor(vset.gold)
    assert score_variant(vset, embeddings, 8) == approx(score_set(vset, {k: v[:, :8] for k, v in embeddings.items()}))
    signs = {k: torch.where(v[:, :8] > 0, 1.0, -1.0) for k, v in embeddings.items()}   # binary STS: cosine of ±1
    assert score_variant(vset, embeddings, 8, "binary") == approx(sts_metrics(signs["text1"], signs["text2"], gold))
    calibration = torch.randn(30, 16, generator=torch.Generator().manual_seed(3))
    ranges = calibration_ranges(calibration, [None, 8])
    assert torch.equal(ranges[8], int8_ranges(truncate(calibration, 8)))
    codes = {k: quantize_int8(truncate(v, 8), ranges[8]).float() for k, v in embeddings.items()}
    assert score_variant(vset, embeddings, 8, "int8", ranges[8]) == approx(sts_metrics(codes["text1"], codes["text2"],
                                                                                       gold))
    keys = variant_metrics(vset, embeddings, [(None, "float32"), (8, "binary"), (4, "float32")])
    assert set(keys) == {f"{m}{s}" for m in ("cosine_spearman", "cosine_pearson") for s in ("", "@8:binary", "@4")}


def test_binary_retrieval_variant_ranks_with_the_rescored_shortlist():
    vset, embeddings = ir_set()
    scored = score_variant(vset, embeddings, 8, "binary", rescore_depth=2)
    packed = quantize_binary(embeddings["corpus"][:, :8])
    ranking = binary_rescored_ranking(F.normalize(embeddings["query"][:, :8], dim=-1), packed, 8, 100, 2)
    from codiemb_pl.evaluation.retrieval import evaluate_rankings

    per_query = evaluate_rankings({q: [vset.doc_ids[i] for i in row] for q, row in zip(vset.query_ids,
                                                                                         ranking.tolist())}, vset.qrels)
    assert scored["ndcg_at_10"] == pytest.approx(sum(v["ndcg_at_10"] for v in per_query.values()) / 4)


def test_summary_averages_each_variant_every_set_has():
    (sts, sts_emb), (ir, ir_emb) = sts_set(), ir_set()
    per_set = {"s": variant_metrics(sts, sts_emb, [(None, "float32"), (8, "float32"), (8, "int8")],
                                    calibration_ranges(sts_emb["text1"], [8])),
               "r": variant_metrics(ir, ir_emb, [(None, "float32"), (8, "float32")])}
    summary = summary_metrics(per_set, {"s": "sts", "r": "ir"})
    assert list(summary) == ["ir_avg", "sts_avg", "avg", "ir_avg@8", "sts_avg@8", "avg@8"]   # @8:int8: STS set only
    assert summary["avg@8"] == pytest.approx((per_set["s"]["cosine_spearman@8"] + per_set["r"]["ndcg_at_10@8"]) / 2)


# -- the commands ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    calibration = folder / "train_texts.txt"
    calibration.write_text("".join(f"training sentence number {i} about topic {i % 7}\n" for i in range(40)))
    code = main(["evaluate", "--model", str(tiny_model_dir), "--sts", "demo_sts=pkg://codiemb_pl/demo/sts_dev.jsonl",
                 "--ir", "demo_ir=pkg://codiemb_pl/demo/ir_dev", "--split", "dev", "--truncate-dim", "16", "8",
                 "--precision", "float32", "int8", "binary", "--calibration", str(calibration),
                 "--output", str(folder / "out.json")])
    assert code == 0
    return json.loads((folder / "out.json").read_text()), calibration


def test_evaluate_scores_every_width_and_precision_from_one_pass(evaluated, tiny_model_dir):
    from codiemb_pl.data.texts import read_texts
    from codiemb_pl.evaluation.suite import set_embeddings
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.workflows.evaluation import load_sets

    results, calibration = evaluated
    encoder = TextEncoder(str(tiny_model_dir))
    ranges = calibration_ranges(encoder.encode(read_texts(str(calibration))), [16])
    for vset in load_sets(["demo_sts=pkg://codiemb_pl/demo/sts_dev.jsonl"], ["demo_ir=pkg://codiemb_pl/demo/ir_dev"],
                          split="dev"):
        embeddings = set_embeddings(encoder, vset)
        metric = "cosine_spearman" if vset.task == "sts" else "ndcg_at_10"
        got = results[vset.name]
        assert got[metric + "@8"] == pytest.approx(score_set(vset, {k: v[:, :8] for k, v in embeddings.items()})[metric],
                                                   abs=1e-6)
        assert got[metric + "@16:int8"] == pytest.approx(score_variant(vset, embeddings, 16, "int8", ranges[16])[metric],
                                                         abs=1e-6)
        assert got["bytes_per_vector"] == 128 and got["bytes_per_vector@8:int8"] == 8
        assert got["bytes_per_vector@16:binary"] == 2 and metric + ":binary" in got


def test_evaluate_prints_the_width_table(tiny_model_dir, capsys):
    assert main(["evaluate", "--model", str(tiny_model_dir), "--sts", "s=pkg://codiemb_pl/demo/sts_dev.jsonl",
                 "--truncate-dim", "8", "--precision", "binary"]) == 0
    out = capsys.readouterr().out
    assert "by width" in out and "bytes per vector binary" in out and "s binary" in out


@pytest.mark.parametrize("extra, problem", [
    (["--truncate-dim", "64"], "--truncate-dim: width 64 is out of range"),
    (["--precision", "int8"], "--precision int8: int8 needs its ranges calibrated on training texts")])
def test_evaluate_bad_width_or_missing_calibration_is_one_line(extra, problem, tiny_model_dir, capsys):
    assert main(["evaluate", "--model", str(tiny_model_dir), "--sts", "s=pkg://codiemb_pl/demo/sts_dev.jsonl",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("codiemb: error:") == 1 and problem in err, err


def test_predict_truncates_and_renormalises(tiny_model_dir, tmp_path, capsys):
    from codiemb_pl.model.encoder import TextEncoder

    source = tmp_path / "texts.txt"
    source.write_text("".join(text + "\n" for text in TEXTS))
    output = tmp_path / "emb.npy"
    assert main(["predict", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path), "--data.predict", str(source),
                 "--predict_output", str(output), "--predict_truncate_dim", "8"]) == 0
    embeddings = np.load(output)
    full = TextEncoder(str(tiny_model_dir), include_prompt=False).encode(TEXTS)
    assert embeddings.shape == (3, 8)
    np.testing.assert_allclose(embeddings, truncate(full, 8).numpy(), atol=1e-5)
    assert "embeddings of dimension 8" in capsys.readouterr().out
    assert main(["predict", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path), "--data.predict", str(source),
                 "--predict_output", str(tmp_path / "none.npy"), "--predict_truncate_dim", "33"]) == 2
    assert "--predict_truncate_dim: width 33 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "none.npy").exists()


def test_mteb_adapter_hands_over_the_first_dimensions(tiny_model_dir):
    from codiemb_pl.errors import InputError
    from codiemb_pl.evaluation.mteb_adapter import MTEBEncoder
    from codiemb_pl.model.encoder import TextEncoder

    encoder = TextEncoder(str(tiny_model_dir))
    got = MTEBEncoder(encoder, truncate_dim=8).encode(TEXTS)
    assert got.shape == (3, 8)
    np.testing.assert_allclose(got, encoder.encode(TEXTS)[:, :8].numpy(), atol=1e-6)
    with pytest.raises(InputError, match="width 40 is out of range"):
        MTEBEncoder(encoder, truncate_dim=40)
