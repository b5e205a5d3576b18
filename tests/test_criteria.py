"""Criteria on hand-made tensors against values computed by hand (numpy), and the criterion registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simdiff.collect.hooks import StatisticsRecorder
from simdiff.collect.stats import LayerStatistics
from simdiff.core.errors import SimdiffError
from simdiff.criteria import CRITERIA, Evidence, Options, get_criterion, normalize

# One batch of N=3 tokens, D=2 dims, for one layer: input X and output Y.
X = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
Y = np.array([[1.0, 1.0], [0.0, 1.0], [-3.0, -4.0]])


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def hand_metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean cosine, and MSSD/MASD of y - x in absolute and input-RMS-relative scale, by the definitions."""
    d = y - x
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    rms = np.sqrt((x**2).mean(1, keepdims=True))
    return {
        "cos": cos.mean(),
        "mssd_absolute": (d**2).mean(),
        "masd_absolute": np.abs(d).mean(),
        "mssd_relative": ((d / rms) ** 2).mean(),
        "masd_relative": np.abs(d / rms).mean(),
    }


def test_hand_metrics_literal_values() -> None:
    """The reference formulas themselves, on numbers small enough to check on paper."""
    m = hand_metrics(X, Y)
    # cos: [1/sqrt2, 1, -1]; Delta = [[0,1],[0,-1],[-6,-8]]
    assert m["cos"] == pytest.approx((1 / math.sqrt(2) + 1 - 1) / 3)
    assert m["mssd_absolute"] == pytest.approx((1 + 1 + 36 + 64) / 6)
    assert m["masd_absolute"] == pytest.approx((1 + 1 + 6 + 8) / 6)
    # rms(x) = [1/sqrt2, sqrt2, 5/sqrt2]
    assert m["mssd_relative"] == pytest.approx((1 * 2 + 1 / 2 + 100 * 2 / 25) / 6)
    assert m["masd_relative"] == pytest.approx((math.sqrt(2) + 1 / math.sqrt(2) + 14 * math.sqrt(2) / 5) / 6)


def test_layer_statistics_match_hand_computation() -> None:
    stats = LayerStatistics(2)
    stats.add_layer(1, t(X), t(Y))
    m = hand_metrics(X, Y)
    assert stats.tokens.tolist() == [0, 3]
    assert stats.hidden_size == 2
    assert stats.mean_cos[1] == pytest.approx(m["cos"], abs=1e-6)
    for scale in ("absolute", "relative"):
        assert stats.mssd(scale)[1] == pytest.approx(m[f"mssd_{scale}"], rel=1e-6)
        assert stats.masd(scale)[1] == pytest.approx(m[f"masd_{scale}"], rel=1e-6)
    assert np.isnan(stats.mean_cos[0])  # no tokens seen for layer 0
    doc = stats.to_dict()
    assert doc["mssd_relative"][1] == pytest.approx(m["mssd_relative"], rel=1e-6)
    assert doc["tokens"] == [0.0, 3.0]


def test_statistics_accumulate_over_batches_per_token() -> None:
    """Two batches weigh every token equally (not every batch)."""
    x2, y2 = np.array([[2.0, 2.0]]), np.array([[1.0, 3.0]])
    stats = LayerStatistics(1)
    stats.add_layer(0, t(X), t(Y))
    stats.add_layer(0, t(x2), t(y2))
    m = hand_metrics(np.vstack([X, x2]), np.vstack([Y, y2]))
    assert stats.tokens[0] == 4
    assert stats.mean_cos[0] == pytest.approx(m["cos"], abs=1e-6)
    assert stats.mssd("relative")[0] == pytest.approx(m["mssd_relative"], rel=1e-6)
    assert stats.masd("absolute")[0] == pytest.approx(m["masd_absolute"], rel=1e-6)


def test_angular_block_distance_matches_hand_computation() -> None:
    """Block of n layers starting at s: arccos(cos(input of s, output of s+n-1)) / pi, mean over tokens."""
    rng = np.random.default_rng(0)
    hidden = [rng.normal(size=(5, 3)) for _ in range(5)]  # hidden[i] = input of layer i; hidden[i+1] = output
    recorder = StatisticsRecorder(4, block_sizes=[1, 2, 3])
    recorder.start_batch(None)
    for layer in range(4):
        recorder.record(layer, t(hidden[layer])[None], t(hidden[layer + 1])[None])

    def angle(a: np.ndarray, b: np.ndarray) -> float:
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return float(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi))

    for n in (1, 2, 3):
        expected = [angle(hidden[s], hidden[s + n]) for s in range(4 - n + 1)]
        np.testing.assert_allclose(recorder.stats.angular(n), expected, rtol=1e-5)
    # literal: orthogonal -> 1/2, opposite -> 1, same direction -> 0
    stats = LayerStatistics(1)
    stats.add_block(1, 0, t(np.array([[1.0, 0], [1, 0], [1, 0]])), t(np.array([[0.0, 3], [-2, 0], [5, 0]])))
    assert stats.angular(1)[0] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-6)
    with pytest.raises(SimdiffError, match="blocks of 4 layers"):
        stats.angular(4)


def stats_from_metrics(cos: list[float], mssd: list[float], masd: list[float],
                       rel_mssd: list[float] | None = None, rel_masd: list[float] | None = None) -> LayerStatistics:
    """LayerStatistics whose derived means are exactly the given per-layer values (10 tokens, D=4)."""
    n, tokens, dim = len(cos), 10.0, 4
    stats = LayerStatistics(n, dim, np.full(n, tokens))
    stats.sums["cos"] = np.asarray(cos) * tokens
    stats.sums["sq"] = np.asarray(mssd) * tokens * dim
    stats.sums["abs"] = np.asarray(masd) * tokens * dim
    stats.sums["rel_sq"] = np.asarray(rel_mssd if rel_mssd is not None else mssd) * tokens * dim
    stats.sums["rel_abs"] = np.asarray(rel_masd if rel_masd is not None else masd) * tokens * dim
    return stats


COS = [0.9, 0.6, 0.8, 0.7, 0.95]  # 1 - cos = [0.1, 0.4, 0.2, 0.3, 0.05]
MSSD = [1.0, 9.0, 4.0, 4.0, 2.0]  # a tie (layers 2, 3)
MASD = [0.5, 2.5, 1.5, 1.0, 3.0]


def hand_minmax(v: list[float]) -> np.ndarray:
    v = np.asarray(v)
    return (v - v.min()) / (v.max() - v.min())


def hand_zscore(v: list[float]) -> np.ndarray:
    v = np.asarray(v)
    return (v - v.mean()) / np.sqrt(((v - v.mean()) ** 2).mean())


HAND_NORMALIZED = {
    "minmax": {"sim": hand_minmax([0.1, 0.4, 0.2, 0.3, 0.05]), "mssd": hand_minmax(MSSD), "masd": hand_minmax(MASD)},
    "zscore": {"sim": hand_zscore([0.1, 0.4, 0.2, 0.3, 0.05]), "mssd": hand_zscore(MSSD), "masd": hand_zscore(MASD)},
    # ranks by hand, lowest 0, ties share the mean rank, divided by n - 1 = 4
    "rank": {"sim": np.array([1, 4, 2, 3, 0]) / 4, "mssd": np.array([0, 4, 2.5, 2.5, 1]) / 4,
             "masd": np.array([0, 3, 2, 1, 4]) / 4},
}


def test_normalisations_by_hand() -> None:
    np.testing.assert_allclose(normalize(np.array(MSSD), "minmax"), [0, 1, 3 / 8, 3 / 8, 1 / 8])
    np.testing.assert_allclose(normalize(np.array(MSSD), "rank"), [0, 1, 0.625, 0.625, 0.25])
    z = normalize(np.array(MSSD), "zscore")  # mean 4, population std sqrt(38/5)
    np.testing.assert_allclose(z, np.array([-3, 5, 0, 0, -2]) / math.sqrt(38 / 5))
    for method in ("minmax", "zscore", "rank"):
        flat = normalize(np.full(4, 3.0), method)  # constant metric -> no information, no NaN
        assert np.all(np.isfinite(flat)) and np.ptp(flat) == 0
    with pytest.raises(SimdiffError, match="unknown normalisation 'l2'"):
        normalize(np.ones(3), "l2")


@pytest.mark.parametrize("method", ["minmax", "zscore", "rank"])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.3, 0.8), (1.0, 0.0), (0.0, 1.0)])
def test_simdiff_combination(method: str, alpha: float, beta: float) -> None:
    evidence = Evidence(5, stats_from_metrics(COS, MSSD, MASD))
    options = Options(alpha=alpha, beta=beta, normalize=method, diff_scale="absolute")
    hand = HAND_NORMALIZED[method]
    expected = alpha * hand["sim"] + (1 - alpha) * (beta * hand["mssd"] + (1 - beta) * hand["masd"])
    np.testing.assert_allclose(get_criterion("simdiff").score(evidence, options), expected, atol=1e-12)


def test_simdiff_diff_scale_selects_the_statistic() -> None:
    rel_mssd, rel_masd = [5.0, 1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]
    evidence = Evidence(5, stats_from_metrics(COS, MSSD, MASD, rel_mssd, rel_masd))
    options = Options(alpha=0.0, beta=1.0, normalize="minmax", diff_scale="relative")
    np.testing.assert_allclose(get_criterion("simdiff").score(evidence, options), hand_minmax(rel_mssd))
    np.testing.assert_allclose(get_criterion("mssd").score(evidence, options), rel_mssd)
    np.testing.assert_allclose(get_criterion("masd").score(evidence, options), rel_masd)
    absolute = Options(diff_scale="absolute")
    np.testing.assert_allclose(get_criterion("mssd").score(evidence, absolute), MSSD)
    np.testing.assert_allclose(get_criterion("masd").score(evidence, absolute), MASD)


def test_block_influence_and_angular_block() -> None:
    stats = stats_from_metrics(COS, MSSD, MASD)
    stats.block_sums[1] = np.array([0.1, 0.2, 0.3, 0.4, 0.5]) * 10
    stats.block_tokens[1] = np.full(5, 10.0)
    stats.block_sums[2] = np.array([0.4, 0.1, 0.3, 0.2]) * 10
    stats.block_tokens[2] = np.full(4, 10.0)
    evidence = Evidence(5, stats)
    np.testing.assert_allclose(get_criterion("block_influence").score(evidence, Options()),
                               [0.1, 0.4, 0.2, 0.3, 0.05])
    angular = get_criterion("angular_block")
    assert angular.is_block
    np.testing.assert_allclose(angular.block_score(evidence, 2), [0.4, 0.1, 0.3, 0.2])
    np.testing.assert_allclose(angular.score(evidence, Options()), [0.1, 0.2, 0.3, 0.4, 0.5])


def test_reverse_and_random() -> None:
    evidence = Evidence(5)
    reverse = get_criterion("reverse").score(evidence, Options())
    assert list(np.argsort(reverse)[:3]) == [3, 2, 1]  # deepest first, the final layer (4) kept
    assert reverse[4] == reverse.max()
    random = get_criterion("random")
    a, b = random.score(evidence, Options(seed=1)), random.score(evidence, Options(seed=1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random.score(evidence, Options(seed=2)))


def test_option_and_name_errors() -> None:
    evidence = Evidence(5, stats_from_metrics(COS, MSSD, MASD))
    with pytest.raises(SimdiffError, match="--alpha must lie in"):
        get_criterion("simdiff").score(evidence, Options(alpha=1.5))
    with pytest.raises(SimdiffError, match="--beta must lie in"):
        get_criterion("simdiff").score(evidence, Options(beta=-0.1))
    with pytest.raises(SimdiffError, match="diff-scale 'log'"):
        get_criterion("simdiff").score(evidence, Options(diff_scale="log"))
    with pytest.raises(SimdiffError, match="Did you mean 'simdiff'"):
        get_criterion("simdif")
    with pytest.raises(SimdiffError, match="needs layer_stats"):
        get_criterion("block_influence").score(Evidence(5), Options())
    with pytest.raises(SimdiffError, match="needs skip_loss_increase"):
        get_criterion("ppl_skip").score(Evidence(5), Options())


def test_registry_lists_every_criterion_with_description_and_reference() -> None:
    expected = {"simdiff", "block_influence", "angular_block", "mssd", "masd", "ppl_skip", "taylor", "reverse",
                "random"}
    assert expected <= set(CRITERIA)
    assert next(iter(CRITERIA)) == "simdiff"
    for spec in CRITERIA.values():
        assert spec.description and spec.reference and "\n" not in spec.description
