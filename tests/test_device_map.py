"""``--device-map`` across devices: statistics at a device boundary, and saving a model accelerate offloaded.

Only CPUs are here, so two kinds of check:

- accelerate itself (``infer_auto_device_map`` + ``dispatch_model`` with a ``max_memory`` that splits a tiny model
  over "cpu" and "disk"): the disk-offloaded layers hold meta parameters that accelerate's hooks load on each
  call, exactly as CPU-offloaded layers do next to GPUs. Statistics, pruning, saving (the save check reads the
  offloaded weights back) and reloading run on that model. Both execution devices are the CPU here, so this
  cannot show arithmetic across devices;
- that arithmetic, with :class:`OnDevice`: a CPU tensor that reports a device of its own and, like a CUDA
  tensor, refuses arithmetic with a tensor of another device. A layer's input and output on two such devices
  reach :class:`StatisticsRecorder` as a forward hook hands them over under accelerate (the input not yet
  moved), and the per-layer and block statistics must equal those of one device.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import compute_module_sizes
from tiny import tiny_model, tiny_tokenizer
from torch.utils._pytree import tree_map
from transformers import AutoModelForCausalLM

from simdiff.collect.hooks import StatisticsRecorder, collect_layer_statistics
from simdiff.data.windows import Batch
from simdiff.model.layers import bypass_layers, find_decoder_layers
from simdiff.model.load import model_device
from simdiff.store.save import save_model
from simdiff.surgery.layers import remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class OnDevice(torch.Tensor):
    """A CPU tensor that says it is on ``self.place``; arithmetic with an ``OnDevice`` of another place raises as
    CUDA does, and ``.to(place)`` moves it there. Results carry their inputs' place."""

    place: torch.device

    @staticmethod
    def __new__(cls, data: torch.Tensor, place: str | torch.device):
        tensor = torch.Tensor._make_subclass(cls, data.as_subclass(torch.Tensor))
        tensor.place = torch.device(place)
        return tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        places = set()
        tree_map(lambda a: places.add(a.place) if isinstance(a, OnDevice) else None, (args, kwargs))
        if func == torch.Tensor.device.__get__:
            return args[0].place
        if func is torch.Tensor.to:
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if target is not None:
                plain = args[0].as_subclass(torch.Tensor)
                rest = [a for a in args[1:] if not isinstance(a, (str, torch.device))]
                return OnDevice(plain.to(*rest, **{k: v for k, v in kwargs.items() if k != "device"}), target)
        if len(places) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{' and '.join(sorted(map(str, places)))}!")
        plain_args, plain_kwargs = tree_map(lambda a: a.as_subclass(torch.Tensor) if isinstance(a, OnDevice) else a,
                                            (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*plain_args, **plain_kwargs)
        place = next(iter(places), None)
        return tree_map(lambda o: OnDevice(o, place) if isinstance(o, torch.Tensor) and place else o, out)


def test_on_device_refuses_cross_device_arithmetic_like_cuda():
    a, b = OnDevice(torch.ones(3), "cuda:0"), OnDevice(torch.ones(3), "cuda:1")
    assert a.device == torch.device("cuda:0") and (a + a).device == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="same device"):
        _ = b - a
    assert (b - a.to(b.device)).device == torch.device("cuda:1")


def hidden_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.bfloat16)
    y = x + 0.3 * torch.randn(2, 5, 16, generator=g, dtype=torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    return x, y, mask


def record_three_layers(place: list[str] | None) -> StatisticsRecorder:
    """Layers 0, 1, 2 (each input = the previous output); with ``place``, layer j's output is on ``place[j]`` and
    its input still on the previous layer's device, as a forward hook sees it under accelerate."""
    recorder = StatisticsRecorder(3, block_sizes=[1, 2, 3])
    x, y, mask = hidden_pair()
    hidden = [x, y, y * 0.9 + 0.1, y * 0.7 - x * 0.2]
    recorder.start_batch(mask if place is None else OnDevice(mask, place[0]))
    for j in range(3):
        h_in, h_out = hidden[j], hidden[j + 1]
        if place is not None:
            h_in, h_out = OnDevice(h_in, place[max(j - 1, 0)]), OnDevice(h_out, place[j])
        recorder.record(j, h_in, h_out)
    return recorder


def test_statistics_at_a_device_boundary_equal_one_devices():
    """Layer 1 starts cuda:1 (input still on cuda:0): the per-layer sums (y - x) and the block of layers 0..2
    (input on cuda:0, output on cuda:1) are computed on one device, in float32, and equal the single-device sums."""
    one = record_three_layers(None).stats
    split = record_three_layers(["cuda:0", "cuda:1", "cuda:1"]).stats
    for name, values in one.sums.items():
        np.testing.assert_allclose(split.sums[name], values, rtol=1e-6, err_msg=name)
    for n, values in one.block_sums.items():
        np.testing.assert_allclose(split.block_sums[n], values, rtol=1e-6, err_msg=f"block {n}")
    assert one.tokens.tolist() == split.tokens.tolist() == [8, 8, 8]


# -- accelerate: a tiny model split over "cpu" and "disk" (meta parameters loaded by hooks) --------------------
def ids() -> torch.Tensor:
    return torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def dispatched(model, layout: str, offload_dir) -> torch.nn.Module:
    """``model`` dispatched by accelerate over "cpu" and "disk". ``inferred``: ``infer_auto_device_map`` with a
    ``max_memory`` that leaves room in "cpu" for the embeddings and three decoder layers only; ``interleaved``: a
    given map with the embeddings, layers 1, 4, 5 and the head on disk (meta parameters)."""
    if layout == "inferred":
        sizes = compute_module_sizes(model)
        budget = sizes["model.embed_tokens"] + 3 * sizes["model.layers.0"]
        layer_class = type(find_decoder_layers(model).modules[0]).__name__
        device_map = infer_auto_device_map(model, max_memory={"cpu": budget, "disk": 10**12},
                                           no_split_module_classes=[layer_class])
    else:
        device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
                      **{f"model.layers.{i}": "disk" if i in (1, 4, 5) else "cpu" for i in range(6)}}
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    return dispatch_model(model, device_map, offload_dir=str(offload_dir))


LAYOUTS = ["inferred", "interleaved"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_of_a_model_split_over_cpu_and_disk_equal_the_plain_models(tmp_path, layout):
    plain = tiny_model("llama", 6)
    model = dispatched(copy.deepcopy(plain), layout, tmp_path / "offload")
    metas = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert any(".layers.5." in n for n in metas)
    assert model_device(model).type == "cpu"  # embeddings on disk (interleaved): their hook's device, not meta
    batch = [Batch(ids(), torch.ones_like(ids()))]
    one = collect_layer_statistics(plain, batch, block_sizes=[2, 3])
    split = collect_layer_statistics(model, batch, block_sizes=[2, 3])
    for name, values in one.sums.items():
        np.testing.assert_allclose(split.sums[name], values, rtol=1e-5, err_msg=name)
    for n, values in one.block_sums.items():
        np.testing.assert_allclose(split.block_sums[n], values, rtol=1e-5, err_msg=f"block {n}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prune_save_and_reload_a_model_split_over_cpu_and_disk(tmp_path, layout):
    """Removal, the verified save (its weight check reads offloaded weights back through accelerate's hooks, the
    KV-cache check runs through them) and a plain reload give the in-memory bypassed model's logits."""
    plain = tiny_model("llama", 6)
    with torch.no_grad(), bypass_layers(plain, [1, 4]):
        reference = plain(input_ids=ids()).logits
    model = dispatched(copy.deepcopy(plain), layout, tmp_path / "offload")
    kept = remove_layers(model, [1, 4])
    assert kept == [0, 2, 3, 5]
    saved = save_model(model, tiny_tokenizer(), tmp_path / "out", {"removed_layers": [1, 4]})
    reloaded = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    assert reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, reference, atol=1e-5, rtol=1e-5)
    assert not any(name.startswith("model.layers.4") for name in model.hf_device_map)  # renumbered: 4 layers left
