"""Held-out selection (simdiff.selection.search): the exact alpha path, disjoint windows, the KL/ppl objectives, best-of."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import data_dir, save_tiny, tiny_model, tiny_tokenizer

from simdiff.cli.main import main
from simdiff.collect.nll import nll_over
from simdiff.config.settings import SearchSettings
from simdiff.core.errors import SimdiffError
from simdiff.criteria import LAYER_STATS, Evidence, Options
from simdiff.data import batches, calibration_batches, load_text, tokenize_text
from simdiff.model.layers import bypass_layers
from simdiff.selection.evidence import choose_one_shot, gather_evidence
from simdiff.selection.search import (
    HeldoutObjective,
    Searcher,
    alpha_path,
    cap_candidates,
    split_calibration,
    split_token_stream,
)
from simdiff.store.save import METADATA_FILE
from simdiff.surgery.heal import healed_bypass, removed_runs, search_healer
from simdiff.workflows.api import Calibration

CALIB = ["--samples", "8", "--calib-seq-len", "64", "--calib-batch-size", "4", "--heldout-samples", "6"]


@pytest.fixture(scope="module")
def calib_slice(tmp_path_factory) -> str:
    """A slice of the WikiText-2 validation text: fast to tokenise."""
    from simdiff.data import load_text

    path = tmp_path_factory.mktemp("calib") / "valid-slice.txt"
    path.write_text(load_text("wikitext2", "valid", data_dir())[:40000], encoding="utf-8")
    return str(path)


def _evidence(num_layers: int = 10, seed: int = 0) -> Evidence:
    model = tiny_model("llama", num_layers, seed=seed)
    calib = batches(torch.randint(4, 256, (4, 24), generator=torch.Generator().manual_seed(seed)), 2)
    return gather_evidence(model, calib, {LAYER_STATS})


@pytest.mark.parametrize("seed,normalize,keep", [(0, "rank", (0, 0)), (1, "minmax", (1, 1)), (2, "zscore", (0, 2))])
def test_alpha_path_finds_every_set_a_fine_grid_finds(seed, normalize, keep):
    evidence = _evidence(seed=seed)
    options = Options(normalize=normalize)
    path = alpha_path(evidence, 4, options, *keep)
    found = {tuple(c.removed) for c in path}
    assert len(found) == len(path)  # distinct sets
    grid = {tuple(choose_one_shot("simdiff", evidence, 4, replace(options, alpha=a), *keep).removed)
            for a in np.linspace(0, 1, 4001)}
    assert grid <= found
    for candidate in path:  # each set is what the criterion itself selects at the recorded alpha
        at = choose_one_shot("simdiff", evidence, 4, replace(options, alpha=candidate.alpha), *keep).removed
        assert at == candidate.removed
        assert candidate.alpha_range[0] <= candidate.alpha <= candidate.alpha_range[1]
        assert all(i >= keep[0] and i < 10 - keep[1] for i in candidate.removed)
    assert path[0].alpha == 0.75  # the default alpha's set comes first (ties go to it)


def test_cap_keeps_the_default_set_and_an_even_spread():
    from simdiff.selection.search import Candidate

    alphas = [0.75, 0.0, 0.1, 0.2, 0.3, 0.5, 0.9, 1.0]
    candidates = [Candidate([i], [f"a{i}"], alpha) for i, alpha in enumerate(alphas)]
    kept, dropped = cap_candidates(candidates, 4)
    assert dropped == 4 and kept[0].alpha == 0.75
    assert sorted(c.alpha for c in kept[1:]) == [0.0, 0.3, 1.0]  # ends and middle of the rest, by alpha
    assert cap_candidates(candidates, 8) == (candidates, 0)


def _tokens(windows: torch.Tensor, bos: int | None = None) -> list[list[int]]:
    return [w[1:].tolist() if bos is not None else w.tolist() for w in windows]


@pytest.mark.parametrize("bos", [None, 7777])
def test_heldout_blocks_are_spread_over_the_stream_and_disjoint_from_scoring_windows(bos):
    ids = torch.arange(20000)  # every token id unique: shared ids would mean shared text
    split = split_token_stream(ids, samples=60, seq_len=64, seed=3, bos=bos, heldout_samples=12, heldout_blocks=4)
    body = 64 - (bos is not None)
    assert split.scoring.shape == (60, 64) and split.heldout.shape == (12, 64)
    if bos is not None:
        assert (split.scoring[:, 0] == bos).all() and (split.heldout[:, 0] == bos).all()
    held = [t for w in _tokens(split.heldout, bos) for t in w]
    assert len(set(held)) == len(held) == 12 * body  # non-overlapping held-out windows
    assert not set(held) & {t for w in _tokens(split.scoring, bos) for t in w}  # never overlapping
    for w in _tokens(split.scoring, bos):  # each scoring window is a contiguous piece of the text
        assert w == list(range(w[0], w[0] + body))
    assert split.blocks == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for j, (start, end) in enumerate(split.spans):  # each block: 3 consecutive windows, contiguous text
        block = [t for w, b in zip(_tokens(split.heldout, bos), split.blocks) if b == j for t in w]
        assert block == list(range(start, end)) and end - start == 3 * body
    assert split.spans[0][0] == 0 and split.spans[-1][1] == 20000  # the first and the last block of the text
    gaps = [b[0] - a[1] for a, b in zip(split.spans, split.spans[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    starts = [w[0] for w in _tokens(split.scoring, bos)]
    in_gap = {next(k for k, (a, b) in enumerate(split.spans) if s < a) for s in starts if s < split.spans[-1][0]}
    assert in_gap == {1, 2, 3}  # scoring windows come from every gap between held-out blocks
    record = split.record()
    assert record["heldout_block_spans"] == split.spans and record["standard_error_unit"] == "blocks"
    again = split_token_stream(ids, samples=60, seq_len=64, seed=3, bos=bos, heldout_samples=12, heldout_blocks=4)
    assert torch.equal(again.scoring, split.scoring) and torch.equal(again.heldout, split.heldout)
    other = split_token_stream(ids, samples=60, seq_len=64, seed=4, bos=bos, heldout_samples=12, heldout_blocks=4)
    assert not torch.equal(other.scoring, split.scoring) and torch.equal(other.heldout, split.heldout)


def test_heldout_split_edges_and_errors():
    ids = torch.arange(5000)
    one = split_token_stream(ids, samples=4, seq_len=64, seed=3, bos=None, heldout_samples=10, heldout_blocks=1)
    assert one.heldout.flatten().tolist() == list(range(5000 - 640, 5000))  # one block: the tail
    more = split_token_stream(ids, samples=4, seq_len=64, seed=3, bos=None, heldout_samples=3, heldout_blocks=8)
    assert more.blocks == [0, 1, 2] and more.spans[0][0] == 0 and more.spans[-1][1] == 5000  # at most one a window
    with pytest.raises(SimdiffError, match="too short.*--heldout-samples"):
        split_token_stream(ids[:700], samples=4, seq_len=64, seed=0, bos=None, heldout_samples=10)
    with pytest.raises(SimdiffError, match="no gap of 64 tokens.*--heldout-blocks"):
        split_token_stream(ids[:1000], samples=4, seq_len=64, seed=0, bos=None, heldout_samples=12, heldout_blocks=12)
    with pytest.raises(SimdiffError, match="--heldout-samples must be >= 1"):
        split_token_stream(ids, samples=4, seq_len=64, seed=0, bos=None, heldout_samples=0)
    with pytest.raises(SimdiffError, match="--heldout-blocks must be >= 2"):
        Calibration(heldout_blocks=1)


def test_paired_standard_error_is_taken_over_blocks():
    """Per-window values grouped by block first: the SE equals numpy's over the block means, not the windows'."""
    rng = np.random.default_rng(5)
    blocks = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    a, b = rng.normal(2.0, 0.3, 10), rng.normal(2.1, 0.3, 10)
    tokens = rng.integers(50, 60, 10).astype(np.float64)
    objective = HeldoutObjective(tiny_model("llama", 2), [], "kl", blocks=blocks)
    objective.cache = {(1,): a * tokens, (2,): b * tokens}  # per-window sums of per-token values
    objective.window_tokens = tokens
    diffs = a - b
    means = np.array([diffs[:3].mean(), diffs[3:5].mean(), diffs[5:8].mean(), diffs[8:].mean()])
    mean, se = objective.paired([1], [2])
    assert mean == pytest.approx(means.mean(), rel=1e-12)
    assert se == pytest.approx(np.std(means, ddof=1) / np.sqrt(4), rel=1e-12)
    assert se != pytest.approx(np.std(diffs, ddof=1) / np.sqrt(10), rel=1e-3)  # not the per-window SE


@torch.no_grad()
def _reference_kl(model, windows: torch.Tensor, removed: list[int]) -> float:
    """Mean over all positions of sum_v p log(p / q) in float64, one window at a time."""
    total, count = 0.0, 0
    for window in windows:
        p = torch.log_softmax(model(window[None]).logits[0].double(), -1)
        with bypass_layers(model, removed):
            q = torch.log_softmax(model(window[None]).logits[0].double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += len(window)
    return total / count


def test_heldout_objectives_match_references_and_evaluate_each_set_once():
    model = tiny_model("llama", 6)
    windows = torch.randint(4, 256, (5, 20), generator=torch.Generator().manual_seed(1))
    kl = HeldoutObjective(model, batches(windows, 2), "kl")
    a, b, dense = kl.scores([[1, 2], [4], []])
    assert a == pytest.approx(_reference_kl(model, windows, [1, 2]), rel=1e-4)
    assert b == pytest.approx(_reference_kl(model, windows, [4]), rel=1e-4)
    assert dense == pytest.approx(0.0, abs=1e-6) and a > 0 and b > 0
    assert kl.passes == 3 + 1  # three candidates and one dense pass
    assert kl.scores([[4], [1, 2]]) == [b, a] and kl.passes == 4  # cached: no new pass
    ppl = HeldoutObjective(model, batches(windows, 2), "ppl")
    with bypass_layers(model, [1, 2]):
        expected = nll_over(model, batches(windows, 2), desc=None).perplexity
    # per-window float64 sums against one float32 sum per batch: equal to float32 rounding
    assert ppl.scores([[1, 2]]) == [pytest.approx(expected, rel=1e-6)] and ppl.passes == 1


def test_heldout_window_values_pair_candidates_window_by_window():
    model = tiny_model("llama", 6)
    windows = torch.randint(4, 256, (5, 20), generator=torch.Generator().manual_seed(2))
    kl = HeldoutObjective(model, batches(windows, 2), "kl")
    kl.scores([[1, 2], [4]])
    for removed in ([1, 2], [4]):  # each window's mean KL, as a one-window reference computes it
        expected = [_reference_kl(model, windows[i:i + 1], removed) for i in range(len(windows))]
        assert kl.window_means(removed) == pytest.approx(expected, rel=1e-3)  # float32 logits
    diffs = np.array([_reference_kl(model, windows[i:i + 1], [4]) - _reference_kl(model, windows[i:i + 1], [1, 2])
                      for i in range(len(windows))])
    mean, se = kl.paired([4], [1, 2])
    assert mean == pytest.approx(diffs.mean(), rel=1e-3)
    assert se == pytest.approx(diffs.std(ddof=1) / math.sqrt(len(diffs)), rel=1e-3)


def test_margin_keeps_the_default_set_unless_a_candidate_beats_it_beyond_noise(calib_slice):
    model, tok = tiny_model("llama", 8), tiny_tokenizer()
    calibration = Calibration(calib_slice, samples=8, seq_len=64, heldout_samples=6, seed=1)  # see the guard
    pool = SearchSettings().pool
    plain = Searcher(model, tok, calibration, SearchSettings(margin=0), [3], pool).search("best-of", 3, Options())
    default_set = plain.candidates[0]
    assert default_set.alpha == 0.75 and default_set.vs_default == [0.0, 0.0]
    # the reference is the set plain `prune` saves: SimDiff at alpha 0.75 on all calibration windows
    prune_evidence = gather_evidence(model, calibration_batches(calibration, tok), {LAYER_STATS})
    assert default_set.removed == choose_one_shot("simdiff", prune_evidence, 3, Options()).removed
    scoring_evidence = gather_evidence(model, batches(split_calibration(tok, calibration).scoring, 4), {LAYER_STATS})
    assert choose_one_shot("simdiff", scoring_evidence, 3, Options()).removed != default_set.removed  # else moot
    assert plain.winner.score == min(c.score for c in plain.candidates)
    assert plain.winner is not default_set  # this seed has a better set than the default's, else the test is moot
    for margin in (0.5, 2.0, 1e9):
        search = Searcher(model, tok, calibration, SearchSettings(margin=margin), [3], pool).search("best-of", 3,
                                                                                                     Options())
        beyond = [c for c in search.candidates[1:] if c.vs_default[0] < -margin * c.vs_default[1]
                  and c.vs_default_nll[0] < -margin * c.vs_default_nll[1]]
        expected = min(beyond, key=lambda c: c.score) if beyond else search.candidates[0]
        assert search.removed == expected.removed, margin
    assert search.removed == default_set.removed  # 1e9 standard errors: nothing can replace it


def test_best_of_is_at_least_as_good_as_each_pooled_criterion(calib_slice):
    model, tok = tiny_model("llama", 8), tiny_tokenizer()
    calibration = Calibration(calib_slice, samples=8, seq_len=64, heldout_samples=6)
    searcher = Searcher(model, tok, calibration, SearchSettings(objective="kl", margin=0), [3], SearchSettings().pool)
    search = searcher.search("best-of", 3, Options())
    assert search.heldout_passes == len(search.candidates) + 1
    # independently: each pooled criterion's selection on the scoring windows, scored by a fresh objective
    scoring, heldout = split_calibration(tok, calibration)
    evidence = gather_evidence(model, batches(scoring, 4), {LAYER_STATS}, [1, 3])
    fresh = HeldoutObjective(model, batches(heldout, 4), "kl")
    for name in ("simdiff", "block_influence", "angular_block", "mssd", "masd"):
        removed = choose_one_shot(name, evidence, 3, Options()).removed
        assert search.winner.score <= fresh.scores([removed])[0] * (1 + 1e-9), name
    assert fresh.scores([search.removed])[0] == pytest.approx(search.winner.score, rel=1e-9)


@pytest.mark.parametrize("objective", ["kl", "ppl"])
def test_prune_alpha_auto_saves_exactly_the_winner(tmp_path, calib_slice, objective):
    folder = save_tiny("llama", tmp_path / "tiny", num_layers=8)
    out = tmp_path / "pruned"
    assert main(["-q", "prune", str(folder), "--num-layers", "3", "--alpha", "auto", "--objective", objective,
                 "--out", str(out), "--calib", calib_slice, *CALIB]) == 0
    meta = json.loads((out / METADATA_FILE).read_text())
    search = meta["alpha_search"]
    assert meta["removed_layers"] == search["removed"]
    assert meta["options"]["alpha"] == search["alpha"]
    scores = [c["score"] for c in search["candidates"]]
    assert len({tuple(c["removed"]) for c in search["candidates"]}) == len(scores)
    default, *others = search["candidates"]  # the reference first; others replace it beyond 3 SE on both only
    beyond = [c["score"] for c in others if c["vs_default"][0] < -3.0 * c["vs_default"][1]
              and c["vs_default_nll"][0] < -3.0 * c["vs_default_nll"][1]]
    assert search["heldout_score"] == min([default["score"], *beyond])
    importance = meta["selection_steps"][0]["importance"]  # the recorded importance ranks the saved set lowest
    assert sorted(range(8), key=lambda i: (importance[i], i))[:3] == sorted(meta["removed_layers"])
    assert search["heldout_passes"] == len(scores) + (objective == "kl")
    assert search["scoring_windows"] == 8 and search["heldout_windows"] == 6
    assert meta["calibration"]["heldout_samples"] == 6 and "valid" in meta["calibration"]["text"]


def test_prune_best_of_records_every_candidate(tmp_path, calib_slice):
    folder = save_tiny("llama", tmp_path / "tiny", num_layers=8)
    out = tmp_path / "pruned"
    assert main(["-q", "prune", str(folder), "--num-layers", "2", "--criterion", "best-of", "--pool",
                 "simdiff,block_influence,taylor", "--out", str(out), "--calib", calib_slice, *CALIB]) == 0
    meta = json.loads((out / METADATA_FILE).read_text())
    best = meta["best_of"]
    assert meta["criterion"] == "best-of" and meta["removed_layers"] == best["removed"]
    sources = [s for c in best["candidates"] for s in c["sources"]]
    assert "block_influence" in sources and "taylor" in sources and any(s.startswith("simdiff alpha=") for s in sources)
    assert all(math.isfinite(c["score"]) for c in best["candidates"])


def test_search_user_errors(tmp_path, capsys, calib_slice):
    folder = save_tiny("llama", tmp_path / "tiny")
    for extra, message in ((["--criterion", "best-of", "--iterative"], "drop --iterative"),
                           (["--criterion", "best-of", "--pool", "simdif"], "unknown criterion 'simdif'"),
                           (["--alpha", "auto", "--heldout-samples", "5000"], "lower --heldout-samples"),
                           (["--alpha", "auto", "--margin", "-1"], "--margin must be a number >= 0"),
                           (["--criterion", "random", "--alpha", "auto"], "no alpha")):
        assert main(["-q", "prune", str(folder), "--num-layers", "2", "--out", str(tmp_path / "x"),
                     "--calib", calib_slice, *CALIB, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _searcher_with_windows(per_window: dict[tuple[int, ...], list[float]], margin: float,
                           nll: dict[tuple[int, ...], list[float]] | None = None) -> Searcher:
    """A Searcher whose held-out objective already holds these per-window KL sums (one token a window) and
    NLL sums (``nll``; default: the KL values)."""
    objective = HeldoutObjective(tiny_model("llama", 2), [], "kl")
    objective.cache = {k: np.asarray(v, dtype=np.float64) for k, v in per_window.items()}
    objective.nll_cache = {k: np.asarray(v, dtype=np.float64) for k, v in (nll or per_window).items()}
    objective.window_tokens = objective.nll_tokens = np.ones(len(next(iter(per_window.values()))))
    searcher = Searcher.__new__(Searcher)
    searcher.objective, searcher.settings = objective, SearchSettings(margin=margin)
    return searcher


def test_margin_rule_on_hand_made_window_values():
    from simdiff.selection.search import Candidate

    default, close, far = (1, 2), (1, 3), (2, 3)
    windows = {default: [1.0, 2.0, 3.0, 4.0],
               close: [0.9, 2.1, 2.8, 4.0],   # diffs -0.1, +0.1, -0.2, 0: mean -0.05, SE 0.0645
               far: [0.5, 1.4, 2.6, 3.3]}     # diffs -0.5, -0.6, -0.4, -0.7: mean -0.55, SE 0.0645

    def pick(margin: float, sets) -> list[int]:
        searcher = _searcher_with_windows(windows, margin)
        candidates = [Candidate(list(k), [str(k)]) for k in sets]
        for c in candidates:
            c.score = searcher.objective.scores([c.removed])[0]
        return searcher._winner(candidates).removed

    assert pick(0, [default, close]) == [1, 3]  # lowest mean wins without a margin
    assert pick(2, [default, close]) == [1, 2]  # 0.05 < 2 x 0.0645: within noise, the default stays
    assert pick(0.5, [default, close]) == [1, 3]  # 0.05 > 0.5 x 0.0645
    assert pick(2, [default, close, far]) == [2, 3]  # 0.55 is 8.5 SE: beyond noise
    assert pick(9, [default, close, far]) == [1, 2]
    windows[default] = [1.0, float("inf"), 3.0, 4.0]  # a broken default set cannot hold its place
    assert pick(2, [default, close]) == [1, 3]


def test_margin_needs_held_out_nll_too():
    """A set far closer to the dense model (KL) that does not predict the held-out text better beyond the
    margin (NLL) does not replace the reference; one that does both, does."""
    from simdiff.selection.search import Candidate

    default, far = (1, 2), (2, 3)
    kl = {default: [1.0, 2.0, 3.0, 4.0], far: [0.5, 1.4, 2.6, 3.3]}  # KL: -0.55 ± 0.0645, 8.5 SE
    level = {default: [5.0, 5.0, 5.0, 5.0], far: [4.9, 5.1, 4.8, 5.0]}  # NLL: -0.05 ± 0.0645, 0.8 SE
    better = {default: [5.0, 5.0, 5.0, 5.0], far: [4.5, 4.4, 4.6, 4.3]}  # NLL: -0.55 ± 0.0645

    def pick(nll) -> Candidate:
        searcher = _searcher_with_windows(kl, 2, nll)
        candidates = [Candidate(list(k), [str(k)]) for k in (default, far)]
        for c in candidates:
            c.score = searcher.objective.scores([c.removed])[0]
        return searcher._winner(candidates), candidates

    winner, candidates = pick(level)
    assert winner.removed == [1, 2]
    assert candidates[1].vs_default == pytest.approx([-0.55, 0.0645497], rel=1e-5)
    assert candidates[1].vs_default_nll == pytest.approx([-0.05, 0.0645497], rel=1e-5)
    assert pick(better)[0].removed == [2, 3]


def test_kl_objective_reads_the_same_held_out_nll_as_the_ppl_objective():
    model = tiny_model("llama", 6)
    windows = torch.randint(4, 256, (5, 20), generator=torch.Generator().manual_seed(3))
    kl, ppl = HeldoutObjective(model, batches(windows, 2), "kl"), HeldoutObjective(model, batches(windows, 2), "ppl")
    kl.scores([[1, 2], [4]])
    ppl.scores([[1, 2], [4]])
    for removed in ([1, 2], [4]):  # one from the KL pass's log-probabilities, one from window_nlls' own pass
        assert kl.nll_cache[tuple(removed)] == pytest.approx(ppl.cache[tuple(removed)], rel=1e-5)
    assert kl.nll_tokens.tolist() == ppl.window_tokens.tolist() == [19.0] * 5
    assert kl.paired([4], [1, 2], "nll") == pytest.approx(ppl.paired([4], [1, 2]), rel=1e-4)


def test_best_of_without_simdiff_in_the_pool_pools_no_alpha_path(calib_slice):
    """--pool without simdiff: only the named criteria compete, and the first one's set is the margin reference."""
    model, tok = tiny_model("llama", 8), tiny_tokenizer()
    calibration = Calibration(calib_slice, samples=8, seq_len=64, heldout_samples=6)
    pool = ["block_influence", "mssd", "masd"]
    search = Searcher(model, tok, calibration, SearchSettings(pool=pool), [3], pool).search("best-of", 3, Options())
    sources = [s for c in search.candidates for s in c.sources]
    assert not any(s.startswith("simdiff") for s in sources), sources
    assert search.candidates[0].sources[0] == "block_influence" and search.candidates[0].vs_default == [0.0, 0.0]
    assert search.costs["reference_calibration_passes"] == 0  # no simdiff reference: no pass for one
    scoring, _ = split_calibration(tok, calibration)
    evidence = gather_evidence(model, batches(scoring, 4), {LAYER_STATS}, [1, 3])
    assert search.candidates[0].removed == choose_one_shot("block_influence", evidence, 3, Options()).removed


def test_best_of_takes_a_numeric_alpha_as_the_margin_reference(calib_slice):
    """--criterion best-of --alpha 0.05: the set simdiff selects at alpha 0.05 is the one kept unless beaten."""
    model, tok = tiny_model("llama", 8), tiny_tokenizer()
    calibration = Calibration(calib_slice, samples=8, seq_len=64, heldout_samples=6, seed=3)  # see the guard
    pool = SearchSettings().pool
    searcher = Searcher(model, tok, calibration, SearchSettings(margin=1e9), [3], pool)
    options = Options(alpha=0.05, normalize="minmax", diff_scale="absolute")
    search = searcher.search("best-of", 3, options)
    reference = search.candidates[0]
    assert reference.alpha == 0.05 and reference.vs_default == [0.0, 0.0]
    assert reference.removed == choose_one_shot("simdiff", searcher.evidence, 3, options).removed
    at_default = choose_one_shot("simdiff", searcher.evidence, 3, replace(options, alpha=0.75)).removed
    assert reference.removed != at_default  # on this model the two alphas select different sets
    assert search.removed == reference.removed  # 1e9 standard errors: nothing replaces it


@torch.no_grad()
def _healed_reference_kl(model, fit, heldout: torch.Tensor, removed: list[int]) -> float:
    """Mean KL(dense || healed candidate) over all held-out positions, float64: the heal fitted on ``fit`` with
    simdiff.surgery.heal's own healed_bypass, the dense logits taken before it."""
    dense = [torch.log_softmax(model(w[None]).logits[0].double(), -1) for w in heldout]
    with healed_bypass(model, fit, removed):
        healed = [torch.log_softmax(model(w[None]).logits[0].double(), -1) for w in heldout]
    return sum(float((p.exp() * (p - q)).sum()) for p, q in zip(dense, healed)) / heldout[:, :].numel()


def _outside_spans(windows: torch.Tensor, stream: torch.Tensor, spans: list[list[int]]) -> bool:
    """Whether every window (after BOS) occurs somewhere in ``stream`` without touching a ``[start, end)`` span."""
    body = windows.shape[1] - 1
    starts = stream.unfold(0, body, 1)
    for window in windows[:, 1:]:
        found = torch.nonzero((starts == window).all(1)).flatten().tolist()
        if not any(all(s + body <= a or s >= b for a, b in spans) for s in found):
            return False
    return True


def test_healed_search_scores_each_set_after_its_heal(calib_slice):
    model, tok = tiny_model("llama", 8), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = Calibration(calib_slice, samples=8, seq_len=64, heldout_samples=6)
    pool = ["simdiff", "random", "block_influence"]  # two distinct sets on this model (keep_first 1)
    searcher = Searcher(model, tok, calibration, SearchSettings(margin=0, pool=pool), [3], pool, keep_first=1,
                        healer=search_healer("linear"), heal_samples=12)
    search = searcher.search("best-of", 3, Options(seed=1))
    assert len(search.candidates) > 1
    assert search.healed and search.to_dict()["healed"] is True
    assert search.costs["heal_fits"] == len(search.candidates)  # one fit per distinct set
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    split, heal_split = split_calibration(tok, calibration), split_calibration(tok, calibration, 12)  # same gaps
    assert heal_split.scoring.shape[0] == 12 and torch.equal(heal_split.heldout, split.heldout)
    stream = tokenize_text(tok, load_text(calib_slice, "valid"))
    assert _outside_spans(heal_split.scoring, stream, split.spans)  # never a held-out token
    assert not _outside_spans(split.heldout[:1], stream, split.spans)  # (the check can fail)
    assert search.costs["heal_fitted_on"].startswith("12 windows")
    fit = batches(heal_split.scoring, calibration.batch_size)
    plain = HeldoutObjective(model, batches(split.heldout, 4), "kl").scores([c.removed for c in search.candidates])
    for candidate, unhealed in zip(search.candidates, plain):
        assert candidate.score == pytest.approx(_healed_reference_kl(model, fit, split.heldout, candidate.removed),
                                                rel=1e-4), candidate.removed
        assert candidate.score != pytest.approx(unhealed, rel=1e-3)  # healed scores are not the plain ones
        assert candidate.heal["folded_into"] == [a - 1 for a, _ in removed_runs(candidate.removed)]
    assert search.winner.score == min(c.score for c in search.candidates)  # margin 0: the best healed set


def test_prune_heal_best_of_saves_the_margin_rules_pick_among_healed_scores(tmp_path, calib_slice):
    folder = save_tiny("llama", tmp_path / "tiny", num_layers=8)
    out = tmp_path / "pruned"
    assert main(["-q", "prune", str(folder), "--num-layers", "3", "--criterion", "best-of", "--heal", "linear",
                 "--pool", "simdiff,random,block_influence", "--seed", "1", "--margin", "0.5", "--out", str(out), "--calib", calib_slice, *CALIB]) == 0
    meta = json.loads((out / METADATA_FILE).read_text())
    search = meta["best_of"]
    assert search["healed"] is True and "healed" in search["objective_description"]
    assert search["heal_fits"] == len(search["candidates"]) > 1
    assert all(c["heal"]["folded_into"] for c in search["candidates"])
    default, *others = search["candidates"]
    beyond = [c for c in others if c["vs_default"][0] < -0.5 * c["vs_default"][1]
              and c["vs_default_nll"][0] < -0.5 * c["vs_default_nll"][1]]  # ahead on held-out KL and NLL
    winner = min([default, *beyond], key=lambda c: c["score"])
    assert meta["removed_layers"] == search["removed"] == winner["removed"]
    assert search["heldout_score"] == winner["score"]
    assert "refitted after the held-out search" in meta["heal"]["fitted_on"] and search["heal_windows"] == 256
    # the saved heal is refitted on the calibration windows: the checkpoint is, tensor for tensor, the one
    # `prune --layers SET --heal linear` saves from the same calibration
    again = tmp_path / "again"
    layers = ",".join(str(i) for i in search["removed"])
    assert main(["-q", "prune", str(folder), "--layers", layers, "--heal", "linear", "--seed", "1", "--out", str(again),
                 "--calib", calib_slice, *CALIB]) == 0
    saved, manual = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert saved.keys() == manual.keys()
    assert all(torch.equal(saved[name], manual[name]) for name in saved)
    changed = json.loads((again / METADATA_FILE).read_text())["heal"]["changed_layers"]
    assert meta["heal"]["changed_layers"] == changed and changed  # the heal did change the weights


def test_saved_importance_ranks_the_saved_set_lowest_when_the_reference_wins(calib_slice):
    """The reference comes from the calibration windows' statistics, so its recorded importance must too."""
    model, tok = tiny_model("llama", 8), tiny_tokenizer()
    calibration = Calibration(calib_slice, samples=8, seq_len=64, heldout_samples=6, seed=1)  # scoring != prune
    searcher = Searcher(model, tok, calibration, SearchSettings(margin=1e9), [3])
    search = searcher.search("alpha", 3, Options())
    assert search.winner is search.candidates[0] and search.winner.statistics == "calibration windows"
    assert search.costs["reference_calibration_passes"] == 1
    given = gather_evidence(model, calibration_batches(calibration, tok), {LAYER_STATS})  # a caller's own pass
    reused = Searcher(model, tok, calibration, SearchSettings(margin=1e9), [3], reference_evidence=given)
    again = reused.search("alpha", 3, Options())
    assert again.removed == search.removed and again.costs["reference_calibration_passes"] == 0
    assert choose_one_shot("simdiff", searcher.evidence, 3, Options()).removed != search.removed  # else moot
    selection, _ = searcher.selection(search, Options())
    importance = selection.steps[0]["importance"]
    assert sorted(sorted(range(8), key=lambda i: (importance[i], i))[:3]) == selection.removed == search.removed
