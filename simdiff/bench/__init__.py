"""Speed and memory measurement: ``simdiff bench`` and the speedup ceiling of pruned models."""

from simdiff.bench.memory import PeakMemory, track_peak
from simdiff.bench.run import BenchSettings, bench_models, compare
from simdiff.bench.weights import WeightCounts, ceiling, weight_bytes, weight_counts

__all__ = ["BenchSettings", "PeakMemory", "WeightCounts", "bench_models", "ceiling", "compare", "track_peak",
           "weight_bytes", "weight_counts"]
