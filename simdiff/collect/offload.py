"""Layer-wise (sequential) calibration for models whose weights do not fit in device memory.

The model stays where it was loaded (CPU RAM, usually). One cheap pass with every decoder layer replaced
by a recording stand-in captures, per batch, the input of layer 0 and the exact keyword arguments each
layer is called with (attention masks, rotary embeddings, ...; per layer, so sliding-window and global
layers each get their own). Then each decoder layer in turn is moved onto the compute device, applied to
every batch's hidden states, which are carried on to the next layer, and moved back: the device holds one
layer plus the activations (the sequential calibration of SparseGPT / llm-compressor).

Statistics go through the same :class:`StatisticsRecorder` as the in-memory hook pass, one recorder per
batch (so block statistics pair each batch's inputs and outputs), merged in batch order; the float64 sums
are added in the same order as the in-memory pass, so the results are equal when the layer outputs are.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simdiff.collect.hooks import StatisticsRecorder, layer_output
from simdiff.collect.stats import LayerStatistics
from simdiff.core.errors import SimdiffError
from simdiff.core.progress import progress
from simdiff.data.windows import Batch
from simdiff.model.layers import SkippedLayer, find_decoder_layers
from simdiff.model.load import model_device

log = logging.getLogger(__name__)


class _StopAfterCapture(Exception):
    """Raised by the last stand-in to skip the final norm and head of the capture pass."""


class LayerCall(SkippedLayer):
    """Stand-in for decoder layer ``index``: records how it was called, returns its input unchanged."""

    def __init__(self, index: int, calls: dict[int, tuple], last: bool) -> None:
        super().__init__(index)
        self.calls = calls
        self.last = last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls[self.index] = (hidden_states if self.index == 0 else None, args, kwargs)
        if self.last:
            raise _StopAfterCapture
        return hidden_states


def move(obj, device: torch.device, memo: dict[int, object]):
    """``obj`` (tensors inside tuples, lists and dicts) on ``device``; shared tensors are moved once.

    ``memo`` is keyed by ``id()``: it must not outlive the objects it was filled from, since Python gives
    a freed object's id to a new one (use one memo per captured batch).
    """
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device, memo) for k, v in obj.items()}
    return obj


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors inside ``obj``."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    return 0


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def capture_layer_calls(model: nn.Module, batch: Batch) -> dict[int, tuple]:
    """Per decoder layer, ``(hidden_states or None, args, kwargs)`` of its call for ``batch``."""
    decoder = find_decoder_layers(model)
    originals = list(decoder.modules)
    calls: dict[int, tuple] = {}
    n = len(originals)
    try:
        for i in range(n):
            decoder.modules[i] = LayerCall(i, calls, last=i == n - 1)
        batch = batch.to(model_device(model))
        with contextlib.suppress(_StopAfterCapture):
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            decoder.modules[i] = layer
    if len(calls) != n:
        raise SimdiffError(f"{type(model).__name__} called {len(calls)} of its {n} decoder layers; "
                           "layer-wise offload needs every layer to be called once per forward")
    return calls


def _statistics_bytes(hidden: list[torch.Tensor], block_sizes: Sequence[int]) -> int:
    """Float32 working set of the recorders: a few [N, D] temporaries of the largest batch, plus the
    block inputs each batch's recorder keeps until the block's last layer."""
    per_batch = [h.numel() * 4 for h in hidden]
    kept = (max(block_sizes) - 1) * sum(per_batch) if block_sizes else 0
    return 6 * max(per_batch) + kept


class LiveTensorBytes(TorchDispatchMode):
    """Within the block, the peak bytes of the tensor storages created there and still referenced.

    Every operator's outputs are seen (on any device); a storage counts from the first tensor an operator
    returns on it (views of and in-place changes to tensors made before the block do not count) until the
    last such tensor is freed. On CUDA the allocator says the same; on CPU nothing else does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [tensors referring to it, bytes]

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_inputs = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat_inputs if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in self._storages:
                if ptr == 0 or ptr in inputs:
                    continue
                self._storages[ptr] = [0, tensor.untyped_storage().nbytes()]
                self.live += self._storages[ptr][1]
                self.peak = max(self.peak, self.live)
            self._storages[ptr][0] += 1
            weakref.finalize(tensor, self._release, ptr)
        return out


def layer_kind(layer: nn.Module) -> tuple[str, ...]:
    """The classes of a layer's modules: layers of one kind have the same working set for the same input."""
    return tuple(type(m).__name__ for m in layer.modules())


@torch.no_grad()
def layer_working_bytes(layers: Sequence[nn.Module], hidden: torch.Tensor, calls: dict[int, tuple],
                        device: torch.device) -> int:
    """The most bytes one call of any kind of layer creates on ``device`` for ``hidden`` (its output, attention
    scores, MLP intermediates, ...), measured by running the first layer of each kind once."""
    first_of_kind: dict[tuple[str, ...], int] = {}
    for i, layer in enumerate(layers):
        first_of_kind.setdefault(layer_kind(layer), i)
    most = 0
    for i in first_of_kind.values():
        home = next(iter(layers[i].parameters()), torch.empty(0)).device
        layers[i].to(device)
        args, kwargs = calls[i]
        with LiveTensorBytes() as tracker:
            out = layer_output(layers[i](hidden, *args, **kwargs))
        layers[i].to(home)
        most = max(most, tracker.peak)
        del out
    return most


@dataclass
class OffloadReport:
    """Device memory of a layer-wise pass: measured by the CUDA allocator, else accounted tensor by tensor."""

    device: str
    peak_device_bytes: int = 0
    measured: bool = False
    largest_layer_bytes: int = 0
    activation_bytes: int = 0
    working_bytes: int = 0
    model_bytes: int = 0
    layer_bytes: list[int] = field(default_factory=list)

    def describe(self) -> str:
        how = "measured" if self.measured else "accounted"
        return (f"peak device memory ({how}) {self.peak_device_bytes / 2**20:.1f} MiB on {self.device}: "
                f"largest layer {self.largest_layer_bytes / 2**20:.1f} MiB + activations "
                f"{self.activation_bytes / 2**20:.1f} MiB, of which one layer call's working set "
                f"{self.working_bytes / 2**20:.1f} MiB (whole model {self.model_bytes / 2**20:.1f} MiB)")


def size_text(size: int) -> str:
    """``size`` bytes in MiB, or in KiB below one MiB."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def collect_layer_statistics_offloaded(
    model: nn.Module,
    batches: Sequence[Batch],
    block_sizes: Sequence[int] = (),
    active_layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    max_device_bytes: int | None = None,
) -> tuple[LayerStatistics, OffloadReport]:
    """The statistics of :func:`simdiff.collect.hooks.collect_layer_statistics`, one layer on ``device`` at a time.

    ``max_device_bytes`` is a budget: the pass refuses to start if one layer plus the carried activations
    would not fit in it.
    """
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise SimdiffError("--offload layerwise places layers itself; drop --device-map")
    device = torch.device(device or "cpu")
    decoder = find_decoder_layers(model)
    n = len(decoder)
    active = set(range(n) if active_layers is None else active_layers)

    calls, hidden, masks = [], [], []
    for batch in progress(batches, desc="layer-wise: capturing layer inputs"):
        captured = capture_layer_calls(model, batch)
        hidden.append(captured[0][0].to(device))
        memo: dict[int, object] = {}  # this batch's only: its tensors are freed once moved, their ids reused
        calls.append({i: move((args, kwargs), device, memo) for i, (_, args, kwargs) in captured.items()})
        masks.append(batch.statistics_mask())

    layer_sizes = [module_bytes(layer) for layer in decoder.modules]
    report = OffloadReport(str(device), largest_layer_bytes=max(layer_sizes), layer_bytes=layer_sizes,
                           model_bytes=module_bytes(model))
    largest = max(range(len(hidden)), key=lambda b: hidden[b].numel())
    report.working_bytes = layer_working_bytes(decoder.modules, hidden[largest], calls[largest], device)
    report.activation_bytes = (2 * tensor_bytes(hidden) + tensor_bytes(calls) + _statistics_bytes(hidden, block_sizes)
                               + report.working_bytes)
    need = report.largest_layer_bytes + report.activation_bytes
    if max_device_bytes is not None and need > max_device_bytes:
        raise SimdiffError(f"one layer plus activations need {size_text(need)} of device memory, more than the "
                           f"budget of {size_text(max_device_bytes)} (--max-device-memory); use fewer --samples or a "
                           "shorter --calib-seq-len")

    recorders = [StatisticsRecorder(n, block_sizes) for _ in batches]
    for recorder, mask in zip(recorders, masks):
        recorder.start_batch(mask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for i in progress(range(n), desc="layer-wise calibration"):
            layer = decoder.modules[i]
            home = next(iter(layer.parameters()), torch.empty(0)).device
            layer.to(device)
            for b, (args, kwargs) in enumerate(batch_calls[i] for batch_calls in calls):
                out = layer_output(layer(hidden[b], *args, **kwargs))
                if i in active:
                    recorders[b].record(i, hidden[b], out)
                hidden[b] = out
            layer.to(home)
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
        report.measured = True
    else:
        report.peak_device_bytes = need
    stats = LayerStatistics(n)
    for recorder in recorders:
        stats.merge(recorder.stats)
    stats.check_finite(None if active_layers is None else list(active_layers), next(model.parameters()).dtype)
    log.info("layer-wise offload: %s", report.describe())
    return stats, report
