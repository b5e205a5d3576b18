"""Data-parallel scoring under ``torchrun`` or ``accelerate launch``.

Each process holds the whole model (on ``cuda:LOCAL_RANK``, or the CPU) and runs the streaming statistics
pass on its share of the calibration batches (batch i goes to rank i mod world size, so every window is
computed in the same batch as in one process); the float64 sums of :class:`LayerStatistics` (and the summed
calibration losses of ``ppl_skip``) are then added across processes with ``all_reduce``. Every rank ends
with the same statistics, hence the same scores and selection; only rank 0 writes outputs. ``taylor`` (its
importances need the summed gradients) is refused.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from simdiff.collect.nll import NLL
from simdiff.collect.stats import PER_LAYER_SUMS, LayerStatistics
from simdiff.core.errors import SimdiffError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World | None:
    """The world described by the launcher's environment (WORLD_SIZE > 1), else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return World(rank, size, int(os.environ.get("LOCAL_RANK", str(rank))))


def active_world() -> World | None:
    """The world of an initialised process group with more than one process, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    launched = launched_world()
    local_rank = launched.local_rank if launched is not None else dist.get_rank()
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def is_main_process() -> bool:
    world = active_world() or launched_world()
    return world is None or world.is_main


def start_data_parallel(device: str | None) -> str | None:
    """Under a launcher, join the process group (gloo on CPU, nccl on CUDA); return this rank's device.

    ``--device cuda`` becomes ``cuda:LOCAL_RANK``. Outside a launcher this returns ``device`` unchanged.
    """
    import torch.distributed as dist

    world = launched_world()
    if world is None:
        return device
    if device == "cuda":
        device = f"cuda:{world.local_rank}"
    on_cuda = device is not None and device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    if not world.is_main:  # one process reports
        from transformers.utils import logging as transformers_logging

        from simdiff.core.progress import set_progress

        logging.getLogger("simdiff").setLevel(logging.WARNING)
        set_progress(False)
        transformers_logging.disable_progress_bar()
    log.info("data-parallel scoring: %d processes, rank %d on %s", world.size, world.rank, device or "cpu")
    return device


def shard_batches(batches: Sequence, world: World) -> list:
    """This rank's batches: batch i goes to rank i mod world size."""
    if len(batches) < world.size:
        raise SimdiffError(f"the calibration gives {len(batches)} batches for {world.size} processes; use more "
                           "--samples or a smaller --calib-batch-size (at least one batch per process)")
    return list(batches[world.rank::world.size])


def _sum_arrays(stats: LayerStatistics) -> list[np.ndarray]:
    """The additive float64 arrays of ``stats``, in a fixed order."""
    arrays = [stats.tokens, *(stats.sums[name] for name in PER_LAYER_SUMS)]
    for n in sorted(stats.block_sums):
        arrays += [stats.block_sums[n], stats.block_tokens[n]]
    return arrays


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """The element-wise float64 sum of ``values`` over every process."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.cpu().numpy()


def all_reduce_statistics(stats: LayerStatistics) -> None:
    """Add every process's float64 sums into ``stats`` (in place), on every process."""
    arrays = _sum_arrays(stats)
    total = all_reduce_sum(np.concatenate(arrays))
    offset = 0
    for array in arrays:
        array[:] = total[offset:offset + array.size]
        offset += array.size


def all_reduce_nll(nll: NLL) -> NLL:
    """A summed NLL over every process's batches (unchanged outside a data-parallel group)."""
    if active_world() is None:
        return nll
    total, tokens = all_reduce_sum(np.array([nll.total, nll.tokens]))
    return NLL(float(total), int(tokens))
