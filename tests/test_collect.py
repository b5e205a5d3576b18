"""The streaming hook pass: agrees with the model's hidden states, streams, ignores padding, fails loudly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from simdiff.collect.hooks import collect_layer_statistics
from simdiff.collect.stats import LayerStatistics
from simdiff.core.errors import SimdiffError
from simdiff.criteria import LAYER_STATS
from simdiff.data.windows import Batch, batches, pad_sequences
from simdiff.model.layers import find_decoder_layers
from simdiff.selection.evidence import gather_evidence

SUMS = ("cos", "sq", "abs", "rel_sq", "rel_abs")


def windows(n: int = 8, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def assert_same_statistics(a: LayerStatistics, b: LayerStatistics, rtol: float = 1e-5) -> None:
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for name in SUMS:
        np.testing.assert_allclose(a.sums[name], b.sums[name], rtol=rtol, err_msg=name)
    assert sorted(a.block_sums) == sorted(b.block_sums)
    for n in a.block_sums:
        np.testing.assert_allclose(a.angular(n), b.angular(n), rtol=rtol, err_msg=f"angular {n}")


def hook_counts(model) -> list[int]:
    return [len(layer._forward_hooks) for layer in find_decoder_layers(model).modules]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text"])
def test_hooks_agree_with_output_hidden_states(family: str) -> None:
    """Per-layer cosine/MSSD and block angles from hooks equal those of the model's own hidden states."""
    model = tiny_model(family, 5)
    ids = windows(4, 10)
    stats = collect_layer_statistics(model, batches(ids, 2), block_sizes=[2])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden[i] is the input of layer i; the last entry may have the final norm applied, so skip the last layer
    for layer in range(4):
        x = hidden[layer].reshape(-1, hidden[layer].shape[-1]).double().numpy()
        y = hidden[layer + 1].reshape(-1, x.shape[1]).double().numpy()
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert stats.tokens[layer] == 40
        assert stats.mean_cos[layer] == pytest.approx(cos.mean(), rel=1e-4)
        assert stats.mssd("absolute")[layer] == pytest.approx(((y - x) ** 2).mean(), rel=1e-4)
    for start in range(3):
        x = hidden[start].reshape(-1, hidden[start].shape[-1]).double().numpy()
        y = hidden[start + 2].reshape(-1, x.shape[1]).double().numpy()
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert stats.angular(2)[start] == pytest.approx(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi), rel=1e-4)
    assert stats.angular(2).shape == (4,)


def test_streaming_equals_one_big_batch() -> None:
    model = tiny_model("llama", 4)
    ids = windows(8, 12)
    streamed = collect_layer_statistics(model, batches(ids, 2), block_sizes=[1, 2])
    whole = collect_layer_statistics(model, batches(ids, 8), block_sizes=[1, 2])
    assert streamed.tokens.tolist() == [96.0] * 4
    assert_same_statistics(streamed, whole)
    merged = collect_layer_statistics(model, batches(ids[:4], 4), block_sizes=[1, 2])
    merged.merge(collect_layer_statistics(model, batches(ids[4:], 4), block_sizes=[1, 2]))
    assert_same_statistics(merged, whole)


def test_padding_is_ignored() -> None:
    """A right-padded batch of unequal sequences gives the statistics of the sequences run one by one."""
    model = tiny_model("llama", 4)
    seqs = [windows(1, 11, seed=1)[0].tolist(), windows(1, 5, seed=2)[0].tolist(), windows(1, 8, seed=3)[0].tolist()]
    padded = pad_sequences(seqs, pad_id=0)
    assert padded.input_ids.shape == (3, 11) and int(padded.attention_mask.sum()) == 24
    together = collect_layer_statistics(model, [padded], block_sizes=[2])
    one_by_one = collect_layer_statistics(
        model, [Batch(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs], block_sizes=[2]
    )
    assert together.tokens.tolist() == [24.0] * 4
    assert_same_statistics(together, one_by_one, rtol=1e-4)
    # the padded positions do carry hidden states: counting them would change the statistics
    unmasked = collect_layer_statistics(model, [Batch(padded.input_ids, torch.ones_like(padded.input_ids))])
    assert unmasked.tokens[0] == 33
    assert not np.allclose(unmasked.mean_cos, together.mean_cos, rtol=1e-4)


def test_non_finite_statistics_name_the_layer_and_hooks_are_removed() -> None:
    model = tiny_model("llama", 4)
    layers = find_decoder_layers(model).modules
    before = hook_counts(model)

    def poison(module, args, output):
        return output * float("nan") if isinstance(output, torch.Tensor) else (output[0] * float("nan"), *output[1:])

    handle = layers[2].register_forward_hook(poison)
    try:
        with pytest.raises(SimdiffError, match=r"non-finite statistics \(\w+\) at layer 2\b"):
            collect_layer_statistics(model, batches(windows(2, 6), 2))
    finally:
        handle.remove()
    assert hook_counts(model) == before


def test_inf_statistics_name_the_layer() -> None:
    stats = LayerStatistics(4)
    x = torch.ones(3, 2)
    stats.add_layer(0, x, x * 2)
    stats.add_layer(3, x, torch.full((3, 2), float("inf")))
    with pytest.raises(SimdiffError, match="at layer 3"):
        stats.check_finite()
    stats.check_finite(layers=[0])  # only the checked layers matter


def test_hooks_removed_when_forward_fails() -> None:
    model = tiny_model("llama", 4)
    before = hook_counts(model)
    bad = Batch(torch.full((1, 4), 10_000), torch.ones(1, 4, dtype=torch.long))  # id beyond the vocabulary
    with pytest.raises((IndexError, RuntimeError)):
        collect_layer_statistics(model, [bad])
    assert hook_counts(model) == before


def test_bypassed_layers_get_no_statistics() -> None:
    """With layer 1 bypassed, layer 2 sees layer 0's output; layer 1 collects nothing."""
    model = tiny_model("llama", 4)
    calib = batches(windows(4, 8), 2)
    evidence = gather_evidence(model, calib, {LAYER_STATS}, removed=[1])
    stats = evidence.layer_stats
    assert stats.tokens.tolist() == [32.0, 0.0, 32.0, 32.0]
    dense = gather_evidence(model, calib, {LAYER_STATS}).layer_stats
    np.testing.assert_allclose(stats.sums["cos"][0], dense.sums["cos"][0], rtol=1e-6)
    assert not np.isclose(stats.sums["cos"][2], dense.sums["cos"][2], rtol=1e-6)
    assert all(type(m).__name__ != "SkippedLayer" for m in find_decoder_layers(model).modules)


def mean_nll(model, calib) -> float:
    from simdiff.collect.nll import nll_over

    return nll_over(model, calib, desc=None).mean


def test_skip_loss_increase_matches_bypassed_losses() -> None:
    from simdiff.collect.model_passes import skip_loss_increase
    from simdiff.model.layers import bypass_layers

    model = tiny_model("llama", 4)
    calib = batches(windows(4, 8), 2)
    increase = skip_loss_increase(model, calib, already_removed=[0])
    assert np.isnan(increase[0])
    with bypass_layers(model, [0]):
        base = mean_nll(model, calib)
    for layer in (1, 2, 3):
        with bypass_layers(model, [0, layer]):
            assert increase[layer] == pytest.approx(mean_nll(model, calib) - base, abs=1e-6)


def test_taylor_matches_manual_gradients() -> None:
    from simdiff.collect.model_passes import taylor_importance
    from simdiff.collect.nll import batch_nll

    model = tiny_model("llama", 3)
    calib = batches(windows(4, 8), 2)
    flags = [p.requires_grad for p in model.parameters()]
    scores = taylor_importance(model, calib)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    totals = [batch_nll(model, b) for b in calib]
    loss = sum(t for t, _ in totals) / sum(c for _, c in totals)
    loss.backward()
    layers = find_decoder_layers(model).modules
    expected = [sum(float((p.detach().double() * p.grad.double()).abs().sum()) for p in layer.parameters())
                for layer in layers]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert np.all(scores > 0)
