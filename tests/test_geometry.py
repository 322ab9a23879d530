"""Embedding-geometry metrics against values worked out by hand on tiny matrices."""

from __future__ import annotations

import math

import pytest
import torch

from codiemb_pl.evaluation.geometry import (
    GEOMETRY_METRIC_NAMES,
    alignment,
    anisotropy,
    condition_number,
    embedding_geometry,
    numerical_rank,
    svd_entropy,
    token_wise_similarity,
    uniformity,
)


def test_token_wise_similarity_averages_pairwise_cosines_per_sentence_ignoring_padding():
    states = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],     # cosines 0, 1/√2, 1/√2 -> √2/3
        [[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]],    # one pair, cosine -1; the third token is padding
        [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]],     # a single token: skipped
    ])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    expected = (math.sqrt(2) / 3 + -1.0) / 2
    assert token_wise_similarity(states, mask) == pytest.approx(expected, abs=1e-12)


def test_token_wise_similarity_is_nan_without_two_token_sentences():
    assert math.isnan(token_wise_similarity(torch.ones(2, 3, 4), torch.tensor([[1, 0, 0], [1, 0, 0]])))


def test_spectrum_metrics_of_a_diagonal_matrix():
    matrix = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])          # σ = (3, 1)
    assert numerical_rank(matrix) == 2
    assert numerical_rank(matrix, tol=0.5) == 1                           # 1 < 0.5·3
    assert svd_entropy(matrix) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-12)
    assert condition_number(matrix) == pytest.approx(3.0, abs=1e-12)


def test_spectrum_metrics_of_a_rank_one_matrix():
    matrix = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert numerical_rank(matrix) == 1
    assert svd_entropy(matrix) == pytest.approx(0.0, abs=1e-6)
    assert condition_number(matrix) > 1e6                                 # σ_min is 0 up to rounding


def test_isotropic_spectrum_has_maximal_entropy():
    assert svd_entropy(torch.eye(4) * 7.0) == pytest.approx(math.log(4), abs=1e-12)
    assert condition_number(torch.eye(4)) == pytest.approx(1.0)


def test_anisotropy_uses_distinct_random_pairs():
    opposite = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])
    assert anisotropy(opposite, num_pairs=500) == pytest.approx(-1.0)     # a pair (i, i) would pull it above -1
    same_direction = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert anisotropy(same_direction, num_pairs=100) == pytest.approx(1.0)


def test_anisotropy_is_reproducible_for_a_seed():
    points = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    assert anisotropy(points, num_pairs=64, seed=3) == anisotropy(points, num_pairs=64, seed=3)
    assert anisotropy(points, num_pairs=64, seed=3) != anisotropy(points, num_pairs=64, seed=4)


def test_alignment_is_mean_squared_distance_of_normalised_pairs():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 2.0]])                            # normalised: (0,1), (0,1)
    assert alignment(x, y) == pytest.approx((2.0 + 0.0) / 2, abs=1e-12)


def test_uniformity_is_log_mean_gaussian_potential_over_pairs():
    points = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])          # squared distances 4, 2, 2
    expected = math.log((math.exp(-8.0) + 2 * math.exp(-4.0)) / 3)
    assert uniformity(points) == pytest.approx(expected, abs=1e-12)


def test_embedding_geometry_bundles_every_matrix_metric():
    points = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    metrics = embedding_geometry(points, points[:10], points[10:20], uniformity_max_points=25)
    assert set(metrics) == set(GEOMETRY_METRIC_NAMES) - {"token_similarity"}
    assert metrics["numerical_rank"] == 6.0
    assert metrics["alignment"] == pytest.approx(alignment(points[:10], points[10:20]))
    assert -4.0 <= metrics["uniformity"] <= 0.0                           # exp(−2·d²) with d² ≤ 4
    assert metrics["uniformity"] != pytest.approx(uniformity(points))    # computed on a 25-row sample
    assert math.isnan(embedding_geometry(points)["alignment"])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        svd_entropy(torch.ones(3))
    with pytest.raises(ValueError):
        alignment(torch.ones(2, 3), torch.ones(3, 3))
