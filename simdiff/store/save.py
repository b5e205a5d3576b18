"""Verified model saving (through the output contract of :mod:`simdiff.core.outputs`), provenance for JSON results."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import sys
from pathlib import Path

from torch import nn

from simdiff.core.outputs import MARKER, Inputs, OutputDir, claimed_dir, fault_point
from simdiff.core.outputs import check_output_dir as check_output_dir
from simdiff.core.progress import progress

log = logging.getLogger(__name__)

METADATA_FILE = MARKER
# save_pretrained serialises a whole shard in memory (50 GB by default): 5 GB shards, the Hub's usual size,
# keep saving at the model plus one shard.
SHARD_SIZE = "5GB"


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("simdiff", "torch", "transformers", "accelerate", "safetensors", "lm_eval", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def command_line() -> str:
    """The exact command that is running (``simdiff ...`` for the console script)."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in {"simdiff", "__main__.py"}:
        argv[0] = "simdiff"
    return " ".join(argv)


def provenance() -> dict:
    """Versions, command and time, for every JSON result."""
    return {
        "versions": package_versions(),
        "command": command_line(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_model(model: nn.Module, tokenizer, folder: Path, metadata: dict, verify: bool = True) -> None:
    """Write weights, tokenizer, ``simdiff.json`` and a model card into ``folder``; verify what was written."""
    from simdiff.model.checks import check_config_consistent
    from simdiff.store.card import drop_stale_config_name, write_model_card
    from simdiff.store.verify import verify_saved

    check_config_consistent(model)  # refuse to write a config that would not rebuild this model
    steps = ["weights", "tokenizer", "metadata", "verify"] if verify else ["weights", "tokenizer", "metadata"]
    for step in progress(steps, desc="saving", leave=False):
        if step == "weights":
            model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
            fault_point("mid-weights", truncate=folder / "model.safetensors")
            fault_point("weights-written")
        elif step == "tokenizer" and tokenizer is not None:
            tokenizer.save_pretrained(folder)
        elif step == "metadata":
            (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            write_model_card(folder, metadata)
            drop_stale_config_name(folder)
        elif step == "verify":
            verify_saved(model, folder, tokenizer)


def save_model(model: nn.Module, tokenizer, out: str | os.PathLike | OutputDir, metadata: dict,
               overwrite: bool = False, verify: bool = True, inputs: Inputs = ()) -> Path:
    """Save ``model`` + tokenizer + ``simdiff.json`` + model card to ``out`` atomically, verified (simdiff.store.verify).

    ``out`` is a path, or an :class:`~simdiff.core.outputs.OutputDir` the caller claimed at the start of its work.
    ``inputs``: the input model(s), which the output may not overlap (see :mod:`simdiff.core.outputs`).
    """
    with claimed_dir(out, overwrite, inputs) as claim, claim.staging() as tmp:
        write_model(model, tokenizer, tmp, metadata, verify)
    log.info("saved %s", claim.path)
    return claim.path
