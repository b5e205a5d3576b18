"""Text sources: WikiText-2 by name (local copy or `datasets`), or .txt/.jsonl files and folders."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from simdiff.errors import SimdiffError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SIMDIFF_DATA_DIR"
NAMED_DATASETS = {"wikitext2": "wikitext-2"}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``explicit``, else ``$SIMDIFF_DATA_DIR``, else None."""
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def _wikitext2_from_datasets(split: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise SimdiffError(
            f"WikiText-2 not found locally: pass --data-dir (or set {DATA_DIR_ENV}) to a folder holding "
            "wikitext-2/{valid,test}.txt, or `pip install simdiff[data]` to download it"
        ) from exc
    hf_split = {"valid": "validation", "test": "test", "train": "train"}[split]
    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    return "".join(rows["text"])


def load_named_text(name: str, split: str, root: str | os.PathLike | None = None) -> str:
    """Text of a named dataset split (``wikitext2`` with split ``valid`` or ``test``)."""
    folder = data_dir(root)
    if folder is not None:
        path = folder / NAMED_DATASETS[name] / f"{split}.txt"
        if not path.is_file():
            raise SimdiffError(f"{path} not found: --data-dir / {DATA_DIR_ENV} must hold wikitext-2/{split}.txt")
        return path.read_text(encoding="utf-8")
    log.info("no local data dir; downloading %s/%s with `datasets`", name, split)
    return _wikitext2_from_datasets(split)


def _read_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SimdiffError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict) or "text" not in row:
                    raise SimdiffError(f"{path}:{number} has no 'text' field; each line must be {{\"text\": ...}}")
                texts.append(str(row["text"]))
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def load_text(source: str, split: str = "valid", root: str | os.PathLike | None = None) -> str:
    """Text from a dataset name, a .txt/.jsonl file, or a folder of them (read in sorted order)."""
    if source in NAMED_DATASETS:
        return load_named_text(source, split, root)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"} and p.is_file())
        if not files:
            raise SimdiffError(f"folder {source!r} holds no .txt or .jsonl files")
        return "\n\n".join(_read_file(p) for p in files)
    if path.is_file():
        if path.suffix not in {".txt", ".jsonl"}:
            raise SimdiffError(f"{source!r}: expected a .txt or .jsonl file, got {path.suffix or 'no suffix'!r}")
        return _read_file(path)
    raise SimdiffError(
        f"text source {source!r} not found: use one of {', '.join(NAMED_DATASETS)} or a path to a "
        ".txt/.jsonl file or folder"
    )
