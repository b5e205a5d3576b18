"""Resumable training checkpoints: adapter weights, optimiser, schedule and history, written atomically."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from simdiff.core.errors import SimdiffError
from simdiff.core.outputs import atomic_directory, check_replaceable

log = logging.getLogger(__name__)

PREFIX = "step-"
STATE_FILE = "state.pt"
TRAINER_FILE = "trainer.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(folder: Path, step: int, state: dict, trainer: dict, keep: int = 0) -> Path:
    """Write ``step-NNNNNNN/`` (tensors in ``state.pt``, JSON in ``trainer.json``) and keep the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / checkpoint_name(step)
    with atomic_directory(target, overwrite=True, marker=TRAINER_FILE, manifest=True) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / TRAINER_FILE).write_text(json.dumps({**trainer, "step": step}, indent=2) + "\n", encoding="utf-8")
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            try:  # only a checkpoint holding exactly the files simdiff recorded in its trainer.json
                check_replaceable(old, TRAINER_FILE, "--checkpoint-dir", manifest=True)
            except SimdiffError as exc:
                log.warning("keeping %s: %s", old, exc)
                continue
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", target)
    return target


def resolve_checkpoint(resume: str, folder: Path | None) -> Path:
    """``resume`` is a checkpoint path, or ``latest`` = the newest checkpoint in ``folder``."""
    if resume == "latest":
        found = list_checkpoints(folder) if folder is not None else []
        if not found:
            raise SimdiffError(f"--resume: no checkpoint in {str(folder)!r}; pass --checkpoint-dir or a "
                               f"checkpoint path like {folder}/{checkpoint_name(50)}")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / TRAINER_FILE).is_file():
        latest = list_checkpoints(path)
        if latest:
            return latest[-1]
        raise SimdiffError(f"--resume {resume!r} is not a checkpoint (no {TRAINER_FILE}) nor a folder of them")
    return path


TRAINER_KEYS = ("step", "config", "history")


def read_trainer(path: Path) -> dict:
    """The JSON part of a checkpoint: step, settings (``config``) and loss history."""
    file = path / TRAINER_FILE
    try:
        trainer = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimdiffError(f"checkpoint file {file} is missing; resume from another checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimdiffError(f"checkpoint file {file} is damaged (not valid JSON); resume from another "
                           "checkpoint") from exc
    if not isinstance(trainer, dict) or any(key not in trainer for key in TRAINER_KEYS):
        raise SimdiffError(f"checkpoint file {file} lacks {', '.join(TRAINER_KEYS)}; resume from another checkpoint")
    return trainer


def read_state(path: Path, mmap: bool = False) -> dict:
    """The tensor part of a checkpoint (adapter, optimiser, schedule); ``mmap`` reads no tensor data."""
    file = path / STATE_FILE
    if not file.is_file():
        raise SimdiffError(f"checkpoint file {file} is missing; resume from another checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged archive
        raise SimdiffError(f"checkpoint file {file} is damaged ({type(exc).__name__}); resume from another "
                           "checkpoint") from exc
    if not isinstance(state, dict) or any(key not in state for key in ("adapter", "optimizer", "scheduler")):
        raise SimdiffError(f"checkpoint file {file} lacks the adapter/optimizer/scheduler state")
    return state


def check_checkpoint_files(path: Path) -> None:
    """Both files of a checkpoint are present and readable (before any model is loaded)."""
    read_trainer(path)
    read_state(path, mmap=True)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensor state, trainer JSON) of one checkpoint."""
    return read_state(path), read_trainer(path)
