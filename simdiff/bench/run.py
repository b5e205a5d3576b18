"""Benchmark one model, or a model against another side by side (interleaved repeats), with the ceiling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from simdiff.bench.measure import Decoder, median, prefill, random_tokens, synchronize, timed
from simdiff.bench.memory import track_peak
from simdiff.bench.weights import WeightCounts, ceiling, weight_bytes, weight_counts
from simdiff.config.settings import BenchSettings
from simdiff.core.errors import SimdiffError
from simdiff.model.load import model_device

log = logging.getLogger(__name__)


def _interleaved(runs: dict[str, Callable[[], float]], settings: BenchSettings) -> dict[str, float]:
    """Median seconds of each run, repeats interleaved across models so load changes hit all alike."""
    for _ in range(settings.warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(settings.repeats):
        for name, fn in runs.items():
            times[name].append(fn())
    return {name: median(values) for name, values in times.items()}


def _memory(figures: dict, tag: str, model: nn.Module, fn: Callable[[], object], device: torch.device) -> None:
    """Memory of one more run of ``fn``: the model's own peak (its weights + the growth of the run), the
    growth alone, and the peak of the whole process/allocator (which holds every benchmarked model)."""
    with track_peak(device) as peak:
        fn()
    figures[f"{tag}_peak_memory_bytes"] = weight_bytes(model) + peak.delta
    figures[f"{tag}_memory_growth_bytes"] = peak.delta
    figures[f"{tag}_process_peak_bytes"] = peak.peak
    figures["memory_method"] = peak.method


def shared_device(models: dict[str, nn.Module]) -> torch.device:
    devices = {model_device(m) for m in models.values()}
    if len(devices) != 1:
        raise SimdiffError(f"benchmarked models must share one device, got {sorted(map(str, devices))}")
    return next(iter(devices))


def describe_models(models: dict[str, nn.Module], settings: BenchSettings) -> dict:
    """The result skeleton: settings, device, and each model's parameter counts and dtype."""
    result: dict = {"settings": asdict(settings), "device": str(shared_device(models)), "models": {}}
    for name, model in models.items():
        result["models"][name] = {"params": weight_counts(model).to_dict(), "figures": {},
                                  "weight_bytes": weight_bytes(model),
                                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    return result


def prefill_figures(models: dict[str, nn.Module], settings: BenchSettings, result: dict) -> None:
    """Prefill tokens/s, milliseconds and peak memory of every model, into ``result``."""
    device = shared_device(models)
    prompts = {name: random_tokens(m, settings.batch_size, settings.seq_len) for name, m in models.items()}
    runs = {name: (lambda m=m, ids=prompts[name]: timed(lambda: prefill(m, ids), device))
            for name, m in models.items()}
    log.info("prefill: batch %d x %d tokens", settings.batch_size, settings.seq_len)
    seconds = _interleaved(runs, settings)
    for name, model in models.items():
        figures = result["models"][name]["figures"]
        figures["prefill_tokens_per_s"] = settings.batch_size * settings.seq_len / seconds[name]
        figures["prefill_ms"] = 1000 * seconds[name]
        _memory(figures, "prefill", model, lambda m=model, n=name: prefill(m, prompts[n]), device)


def decode_figures(models: dict[str, nn.Module], batch: int, settings: BenchSettings, result: dict,
                   compile: bool | None = None) -> None:
    """Decode tokens/s, ms per token and peak memory at ``batch`` of every model, into ``result``."""
    device = shared_device(models)
    compile = settings.compile if compile is None else compile
    tag = f"decode_b{batch}" + ("_compiled" if compile else "")
    log.info("%s: %d-token prompt, %d new tokens%s", tag, settings.prompt_len, settings.new_tokens,
             " (static cache, torch.compile)" if compile else "")
    decoders = {name: Decoder(m, batch, settings.prompt_len, settings.new_tokens, compile, settings.compile_backend)
                for name, m in models.items()}
    seconds = _interleaved({name: d.run for name, d in decoders.items()}, settings)
    for name, dec in decoders.items():
        figures = result["models"][name]["figures"]
        model = models[name]
        figures[f"{tag}_tokens_per_s"] = batch * settings.new_tokens / seconds[name]
        figures[f"{tag}_ms_per_token"] = 1000 * seconds[name] / settings.new_tokens
        _memory(figures, tag, model, dec.run, device)
    del decoders
    synchronize(device)


def bench_models(models: dict[str, nn.Module], settings: BenchSettings | None = None) -> dict:
    """Figures of every model (same shapes, repeats interleaved); with two models, the speedups too.

    The first model is the reference ("dense"); speedups are reference time / other time.
    """
    settings = settings or BenchSettings()
    settings.check()
    result = describe_models(models, settings)
    prefill_figures(models, settings, result)
    for batch in sorted({1, settings.decode_batch}):
        decode_figures(models, batch, settings, result)
    if len(models) == 2:
        result["comparison"] = compare(result, *models)
    return result


def compare(result: dict, reference: str, other: str) -> dict:
    """Speedup of ``other`` over ``reference`` for every figure, the ceiling, and each speedup / ceiling."""
    ref, oth = result["models"][reference], result["models"][other]
    limit = ceiling(WeightCounts(**ref["params"]), WeightCounts(**oth["params"]))
    speedups: dict[str, float] = {}  # figure -> reference/other time or memory, other/reference rate
    for key, value in ref["figures"].items():
        if not isinstance(value, (int, float)):
            continue
        num, den = (oth["figures"][key], value) if key.endswith("tokens_per_s") else (value, oth["figures"][key])
        if den > 0:
            speedups[key] = num / den
    fractions = {k: v / limit for k, v in speedups.items() if k.endswith("tokens_per_s")}
    return {"reference": reference, "other": other, "ceiling": limit, "speedup": speedups,
            "fraction_of_ceiling": fractions}
