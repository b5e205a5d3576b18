"""Layer-wise offload gives the in-memory statistics under a memory cap; --device-map auto runs on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model, tiny_workspace

from simdiff.cli.main import main
from simdiff.collect.hooks import collect_layer_statistics
from simdiff.collect.offload import LiveTensorBytes, collect_layer_statistics_offloaded, module_bytes
from simdiff.core.errors import SimdiffError
from simdiff.data import batches
from simdiff.model.layers import find_decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CALIB = ["--samples", "4", "--calib-seq-len", "24", "--calib-batch-size", "2"]



def calibration_batches() -> list:
    ids = torch.randint(4, 256, (5, 20), generator=torch.Generator().manual_seed(0))
    return batches(ids, 2)  # 3 batches, the last one smaller


def assert_same_statistics(a: dict, b: dict, rel: float = 1e-6) -> None:
    for key in ("tokens", "mean_cos", "mssd_absolute", "masd_absolute", "mssd_relative", "masd_relative"):
        np.testing.assert_allclose(b[key], a[key], rtol=rel, atol=0, err_msg=key)
    assert a["angular"].keys() == b["angular"].keys()
    for n in a["angular"]:
        np.testing.assert_allclose(b["angular"][n], a["angular"][n], rtol=rel, atol=0, err_msg=f"angular {n}")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_layerwise_equals_in_memory_within_a_budget_the_model_exceeds(family):
    model = tiny_model(family, num_layers=8)
    data = calibration_batches()
    reference = collect_layer_statistics(model, data, block_sizes=[1, 3])
    _, probe = collect_layer_statistics_offloaded(model, data, block_sizes=[1, 3])
    need = probe.largest_layer_bytes + probe.activation_bytes
    assert module_bytes(model) > need  # the whole model would not fit in the budget
    stats, _ = collect_layer_statistics_offloaded(model, data, block_sizes=[1, 3], max_device_bytes=need)
    assert_same_statistics(reference.to_dict(), stats.to_dict())
    with pytest.raises(SimdiffError, match="more than the budget"):
        collect_layer_statistics_offloaded(model, data, block_sizes=[1, 3], max_device_bytes=need - 1)


def test_live_tensor_bytes_counts_what_is_allocated_and_still_held():
    made_before = torch.zeros(1000)
    with LiveTensorBytes() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # 8000 bytes: 12000 live
        view = b[:10]
        made_before.add_(1)  # in place on a tensor made outside: not counted
        del a
        c = torch.empty(500)  # 2000 bytes: 10000 live
        del b  # the view still holds its storage
    assert (tracker.peak, tracker.live) == (12000, 10000)
    assert view.shape == (10,) and c.shape == (500,)


@pytest.mark.parametrize("family, seq_len", [("llama", 20), ("llama", 96), ("gemma3_text", 96), ("qwen3_moe", 48)])
def test_accounted_need_covers_the_tensors_the_pass_really_holds(family, seq_len):
    """The budget check trusts the accounted activations; every tensor the pass creates, measured while it
    runs (the attention scores and MLP intermediates of a layer call included), must fit in them."""
    model = tiny_model(family, num_layers=4)
    ids = torch.randint(4, 256, (5, seq_len), generator=torch.Generator().manual_seed(0))
    with LiveTensorBytes() as tracker:
        _, report = collect_layer_statistics_offloaded(model, batches(ids, 2), block_sizes=[1, 3])
    assert tracker.peak <= report.activation_bytes, (tracker.peak, report.activation_bytes)


def test_layerwise_with_bypassed_layers_matches_in_memory():
    from simdiff.model.layers import bypass_layers

    model = tiny_model("qwen3", num_layers=6)
    data = calibration_batches()
    active = [0, 1, 3, 5]
    with bypass_layers(model, [2, 4]):
        reference = collect_layer_statistics(model, data, active_layers=active)
        stats, _ = collect_layer_statistics_offloaded(model, data, active_layers=active)
    np.testing.assert_allclose(stats.mean_cos[active], reference.mean_cos[active], rtol=1e-6)
    np.testing.assert_allclose(stats.mssd("relative")[active], reference.mssd("relative")[active], rtol=1e-6)
    assert stats.tokens[2] == 0 and stats.tokens[4] == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    return tiny_workspace(root)


def score_json(ws: dict[str, Path], name: str, *extra: str) -> dict:
    out = ws["root"] / f"{name}.json"
    argv = ["-q", "score", str(ws["model"]), "--calib", str(ws["calib"]), *CALIB, "--criterion",
            "simdiff,block_influence,angular_block,mssd,masd", "--block-size", "2", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_cli_offload_and_device_map_give_the_in_memory_scores(checkpoint):
    plain = score_json(checkpoint, "plain")
    offloaded = score_json(checkpoint, "offloaded", "--offload", "layerwise", "--device", "cpu")
    mapped = score_json(checkpoint, "mapped", "--device-map", "auto")
    for other in (offloaded, mapped):
        assert_same_statistics(plain["statistics"]["layer"], other["statistics"]["layer"])
        for name, values in plain["scores"].items():
            np.testing.assert_allclose(other["scores"][name], values, rtol=1e-6)


def test_cli_prune_with_offload_removes_the_same_layers(checkpoint):
    runs = {}
    for name, extra in {"plain": [], "offloaded": ["--offload", "layerwise"]}.items():
        out = checkpoint["root"] / f"pruned-{name}"
        argv = ["-q", "prune", str(checkpoint["model"]), "--calib", str(checkpoint["calib"]), *CALIB,
                "--num-layers", "2", "--out", str(out), *extra]
        assert main(argv) == 0
        runs[name] = json.loads((out / "simdiff.json").read_text())["removed_layers"]
    assert runs["plain"] == runs["offloaded"]


def test_cli_offload_refuses_criteria_that_need_the_whole_model(checkpoint, capsys):
    argv = ["-q", "score", str(checkpoint["model"]), "--calib", str(checkpoint["calib"]), *CALIB,
            "--criterion", "ppl_skip", "--offload", "layerwise"]
    assert main(argv) == 2
    assert "--offload layerwise" in capsys.readouterr().err


def padded_batches_of_different_sizes() -> list:
    """3 batches (2, 2, 1 rows) of sequences of different lengths: every batch has its own padding mask."""
    from simdiff.data.windows import pad_sequences

    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(4, 256, (n,), generator=generator).tolist() for n in (12, 7, 9, 16, 5)]
    return [pad_sequences(sequences[i:i + 2], pad_id=0) for i in range(0, 5, 2)]


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    return []


def test_each_layer_gets_its_own_batchs_mask_and_rotary_tables_when_ids_are_reused(monkeypatch):
    """On CUDA the captured CPU tensors are freed once moved and Python hands their ids to the next batch's
    tensors; a memo keyed by id() that outlives a batch then gives a later batch an earlier batch's mask.
    On CPU ``.to("cpu")`` returns the tensor itself, so the memo keeps it alive and ids are never reused;
    here ``id`` is replaced by the worst case of that reuse: the k-th distinct tensor met while moving a
    batch gets the id the k-th tensor of the previous batch had."""
    from simdiff.collect import offload

    model = tiny_model("llama", num_layers=4)
    data = padded_batches_of_different_sizes()
    expected = [offload.capture_layer_calls(model, batch) for batch in data]
    slots: dict[int, int] = {}

    def capture_then_reuse_ids(model, batch):
        slots.clear()  # the previous batch's tensors are gone: their ids are free again
        return capture_layer_calls(model, batch)

    def reused_id(obj) -> int:
        return slots.setdefault(builtin_id(obj), len(slots)) if isinstance(obj, torch.Tensor) else builtin_id(obj)

    builtin_id, capture_layer_calls = id, offload.capture_layer_calls
    monkeypatch.setattr(offload, "capture_layer_calls", capture_then_reuse_ids)
    monkeypatch.setattr(offload, "id", reused_id, raising=False)
    seen: list[tuple[int, dict]] = []
    layers = find_decoder_layers(model).modules
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.append((i, kwargs)), with_kwargs=True)
             for i, layer in enumerate(layers)]
    try:
        stats, _ = offload.collect_layer_statistics_offloaded(model, data)
    finally:
        for hook in hooks:
            hook.remove()
    seen = seen[-4 * len(data):]  # the layer-by-layer pass (before it, one probe call measures a layer's working set)
    assert [i for i, _ in seen] == [i for i in range(4) for _ in data]
    for n, (i, kwargs) in enumerate(seen):
        got, want = tensors_in(kwargs), tensors_in(expected[n % len(data)][i][2])
        assert "attention_mask" in kwargs and len(got) == len(want) >= 3  # mask, cos, sin (at least)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b), f"layer {i} got another batch's tensors"
    monkeypatch.undo()
    assert_same_statistics(collect_layer_statistics(model, data).to_dict(), stats.to_dict())


def test_cli_max_device_memory_reaches_the_layerwise_budget(checkpoint, capsys, monkeypatch):
    """--max-device-memory (a size like 40GiB) is the budget collect_layer_statistics_offloaded refuses beyond:
    1KiB is refused before the calibration pass in score and prune (one line, exit 2, nothing written),
    1GiB passes; without --offload layerwise, or not a size, it is refused before the model loads."""
    import simdiff.collect.offload as offload

    budgets = []
    real = offload.collect_layer_statistics_offloaded
    monkeypatch.setattr("simdiff.selection.evidence.collect_layer_statistics_offloaded",
                        lambda *a, **k: budgets.append(k.get("max_device_bytes")) or real(*a, **k))
    common = [str(checkpoint["model"]), "--calib", str(checkpoint["calib"]), *CALIB, "--offload", "layerwise"]
    out = checkpoint["root"] / "budget"
    capsys.readouterr()
    for argv in (["score", *common, "--criterion", "simdiff"], ["prune", *common, "--num-layers", "2", "--out", str(out)]):
        assert main(["-q", *argv, "--max-device-memory", "1KiB"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and "more than the budget of 1.0 KiB (--max-device-memory)" in err, err
    assert budgets == [1024, 1024] and not out.exists()
    assert main(["-q", "score", *common, "--criterion", "simdiff", "--max-device-memory", "1GiB"]) == 0
    assert budgets[-1] == 2**30
    with pytest.raises(SystemExit) as parse_error:  # argparse: usage and the error line, exit 2
        main(["-q", "score", *common, "--max-device-memory", "40 parsecs"])
    assert parse_error.value.code == 2
    assert "expected a size like 40GiB, 512MiB or 8GB, got '40 parsecs'" in capsys.readouterr().err
    plain = [str(checkpoint["model"]), "--calib", str(checkpoint["calib"]), *CALIB]
    for argv, message in (([*plain, "--max-device-memory", "1GiB"], "is the device budget of --offload layerwise"),
                          ([*common, "--max-device-memory", "0"], "must be a positive size such as 40GiB, got 0")):
        assert main(["-q", "score", *argv]) == 2
        assert message in capsys.readouterr().err
    assert len(budgets) == 3  # none of the refusals got as far as the calibration pass
