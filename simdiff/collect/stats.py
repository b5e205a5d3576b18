"""Per-layer statistics, accumulated in float64 over batches without keeping hidden states.

For layer l with input x_t and output y_t (one hidden vector per non-padding token t, D dims each) and
Delta_t = y_t - x_t, we keep running sums over tokens of:

- ``cos``      cos(x_t, y_t)
- ``sq``       sum_d Delta_td^2                     -> MSSD (absolute)  = sq / (N*D)
- ``abs``      sum_d |Delta_td|                     -> MASD (absolute)  = abs / (N*D)
- ``rel_sq``   sum_d (Delta_td / rms(x_t))^2        -> MSSD (relative)  = rel_sq / (N*D)
- ``rel_abs``  sum_d |Delta_td| / rms(x_t)          -> MASD (relative)  = rel_abs / (N*D)

and, for contiguous blocks of n layers starting at s, the sum over tokens of the angular distance
arccos(cos(x_t^(s), y_t^(s+n-1))) / pi (Gromov et al.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from simdiff.core.errors import SimdiffError

EPS = 1e-12
PER_LAYER_SUMS = ("cos", "sq", "abs", "rel_sq", "rel_abs")


def token_vectors(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Non-padding token vectors of a ``[B, T, D]`` tensor as float32 ``[N, D]``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if mask is not None:
        flat = flat[mask.reshape(-1).to(flat.device).bool()]
    return flat.float()


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``[N, D]`` tensors."""
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(EPS)


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise arccos(cos)/pi in [0, 1]."""
    return torch.arccos(cosine(x, y).clamp(-1.0, 1.0)) / math.pi


def layer_sums(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The per-layer sums of one batch, from ``[N, D]`` float token vectors of input and output."""
    delta = y - x
    rms = (x.norm(dim=-1) / math.sqrt(x.shape[-1])).clamp_min(EPS)
    sq = delta.pow(2).sum(-1)
    ab = delta.abs().sum(-1)
    per_token = {"cos": cosine(x, y), "sq": sq, "abs": ab, "rel_sq": sq / rms.pow(2), "rel_abs": ab / rms}
    return {name: float(v.double().sum()) for name, v in per_token.items()}


def non_finite_advice(dtype: torch.dtype | None) -> str:
    """What to try when statistics are NaN/inf, given the dtype the model ran in."""
    if dtype == torch.float16:
        return "run with --dtype float32 or bfloat16 instead of float16"
    if dtype == torch.bfloat16:
        return "run with --dtype float32 instead of bfloat16"
    if dtype in (torch.float32, torch.float64):
        return (f"the model already ran in {str(dtype).removeprefix('torch.')}, so its weights or the input hold "
                "NaN/inf: check the checkpoint (e.g. a damaged or diverged model)")
    return "check the checkpoint, or run with --dtype float32"


@dataclass
class LayerStatistics:
    """Running float64 sums for ``num_layers`` layers; see the module docstring for definitions."""

    num_layers: int
    hidden_size: int = 0
    tokens: np.ndarray = field(default=None)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    block_sums: dict[int, np.ndarray] = field(default_factory=dict)
    block_tokens: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = np.zeros(self.num_layers, dtype=np.float64)
        for name in PER_LAYER_SUMS:
            self.sums.setdefault(name, np.zeros(self.num_layers, dtype=np.float64))

    # -- accumulation -------------------------------------------------------------------------------
    def add_layer(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch of ``[N, D]`` token vectors (input ``x``, output ``y``) of ``layer``."""
        self.hidden_size = x.shape[-1]
        for name, value in layer_sums(x, y).items():
            self.sums[name][layer] += value
        self.tokens[layer] += x.shape[0]

    def add_block(self, block_size: int, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the angular distance between the input of ``start`` and the output of ``start+n-1``."""
        n_starts = self.num_layers - block_size + 1
        if block_size not in self.block_sums:
            self.block_sums[block_size] = np.zeros(n_starts, dtype=np.float64)
            self.block_tokens[block_size] = np.zeros(n_starts, dtype=np.float64)
        self.block_sums[block_size][start] += float(angular_distance(x, y).double().sum())
        self.block_tokens[block_size][start] += x.shape[0]

    def merge(self, other: LayerStatistics) -> None:
        """Add another accumulator's sums into this one (for sharded or streamed collection)."""
        self.hidden_size = self.hidden_size or other.hidden_size
        self.tokens += other.tokens
        for name in PER_LAYER_SUMS:
            self.sums[name] += other.sums[name]
        for n, values in other.block_sums.items():
            if n in self.block_sums:
                self.block_sums[n] += values
                self.block_tokens[n] += other.block_tokens[n]
            else:
                self.block_sums[n] = values.copy()
                self.block_tokens[n] = other.block_tokens[n].copy()

    # -- derived means -------------------------------------------------------------------------------
    def _mean(self, name: str, per_dim: bool) -> np.ndarray:
        denom = self.tokens * (self.hidden_size if per_dim else 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[name] / denom

    @property
    def mean_cos(self) -> np.ndarray:
        return self._mean("cos", per_dim=False)

    def mssd(self, scale: str = "absolute") -> np.ndarray:
        return self._mean("sq" if scale == "absolute" else "rel_sq", per_dim=True)

    def masd(self, scale: str = "absolute") -> np.ndarray:
        return self._mean("abs" if scale == "absolute" else "rel_abs", per_dim=True)

    def angular(self, block_size: int) -> np.ndarray:
        """Mean angular distance of every contiguous block of ``block_size`` layers (one per start)."""
        if block_size not in self.block_sums:
            raise SimdiffError(f"angular distances for blocks of {block_size} layers were not collected")
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.block_sums[block_size] / self.block_tokens[block_size]

    def subset(self, layers: list[int]) -> LayerStatistics:
        """The per-layer statistics of ``layers`` only (block statistics are not carried over)."""
        sub = LayerStatistics(len(layers), self.hidden_size, self.tokens[layers].copy())
        sub.sums = {name: values[layers].copy() for name, values in self.sums.items()}
        return sub

    def check_finite(self, layers: list[int] | None = None, dtype: torch.dtype | None = None) -> None:
        """Raise a clear error naming the first layer whose statistics are NaN/inf.

        ``dtype`` is the model's: the advice suggests a wider dtype only when there is one to switch to.
        """
        indices = np.arange(self.num_layers) if layers is None else np.asarray(layers, dtype=int)
        for name in PER_LAYER_SUMS:
            bad = indices[~np.isfinite(self.sums[name][indices])]
            if bad.size:
                raise SimdiffError(f"non-finite statistics ({name}) at layer {int(bad[0])}: the hidden states "
                                   f"overflowed or hold NaN; {non_finite_advice(dtype)}")
        for n, values in self.block_sums.items():
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise SimdiffError(f"non-finite angular distance for the block of {n} layers starting at layer "
                                   f"{int(bad[0])}; {non_finite_advice(dtype)}")

    def to_dict(self) -> dict:
        """Raw sums and the derived means, JSON-serialisable."""
        out = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "tokens": self.tokens.tolist(),
            "sums": {k: v.tolist() for k, v in self.sums.items()},
            "mean_cos": self.mean_cos.tolist(),
            "mssd_absolute": self.mssd("absolute").tolist(),
            "masd_absolute": self.masd("absolute").tolist(),
            "mssd_relative": self.mssd("relative").tolist(),
            "masd_relative": self.masd("relative").tolist(),
        }
        out["angular"] = {str(n): self.angular(n).tolist() for n in sorted(self.block_sums)}
        return out
