"""Load PIQA's validation split from a local folder (``valid.jsonl`` + ``valid-labels.lst``)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def piqa_rows(folder: str | os.PathLike) -> list[dict]:
    """Questions of ``folder/valid.jsonl`` joined line by line with the labels of ``valid-labels.lst``."""
    folder = Path(folder)
    with (folder / "valid.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    labels = [line.strip() for line in (folder / "valid-labels.lst").read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label]
    if len(labels) != len(rows):
        raise ValueError(f"{folder}: {len(rows)} questions but {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in zip(rows, labels)]


def load_piqa(data_dir: str | None = None, **_metadata):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with the local validation split."""
    import datasets

    folder = Path(data_dir or os.environ.get("SIMDIFF_DATA_DIR", "")) / "piqa"
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(piqa_rows(folder))})
