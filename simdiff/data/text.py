"""Text sources: WikiText-2 by name (local copy or `datasets`), or .txt/.jsonl files and folders.

``wikitext2`` is the **raw** WikiText-2 (``wikitext-2-raw-v1``: the text papers report perplexity on), offline
and online. Offline, the test split is ``wikitext-2-raw/test.txt``. A raw validation split is read from
``wikitext-2-raw/valid.txt`` when the data folder has one; the shared data folder has none, so calibration
then falls back to the tokenised release's ``wikitext-2/valid.txt`` and says so in the recorded variant
(:func:`text_variant`). ``wikitext2-tok`` names the tokenised release (``<unk>``, `` @-@ ``) explicitly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from simdiff.errors import SimdiffError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SIMDIFF_DATA_DIR"
# name -> (local folders in order of preference, `datasets` config); the first folder holding the split wins
NAMED_DATASETS = {
    "wikitext2": (("wikitext-2-raw", "wikitext-2"), "wikitext-2-raw-v1"),
    "wikitext2-tok": (("wikitext-2",), "wikitext-2-v1"),
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``explicit``, else ``$SIMDIFF_DATA_DIR``, else None."""
    value = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def local_text_path(name: str, split: str, folder: Path) -> Path | None:
    """The local file a named source reads for ``split`` in ``folder`` (None when no candidate exists)."""
    for sub in NAMED_DATASETS[name][0]:
        path = folder / sub / f"{split}.txt"
        if path.is_file():
            return path
    return None


def text_variant(source: str, split: str, root: str | os.PathLike | None = None) -> str:
    """Which text ``load_text(source, split, root)`` reads, for the record: dataset config and file, or path."""
    if source not in NAMED_DATASETS:
        return str(Path(source).expanduser())
    folder = data_dir(root)
    config = NAMED_DATASETS[source][1]
    if folder is None:
        return f"{config}/{split} (downloaded with `datasets`)"
    path = local_text_path(source, split, folder)
    if path is None:
        return f"{config}/{split} (missing in {folder})"
    variant = "wikitext-2-raw-v1" if path.parent.name == "wikitext-2-raw" else "wikitext-2-v1 (tokenised)"
    return f"{variant}/{split} ({path})"


def _wikitext2_from_datasets(split: str, config: str = "wikitext-2-raw-v1") -> str:
    try:
        import datasets
    except ImportError as exc:
        raise SimdiffError(
            f"WikiText-2 not found locally: pass --data-dir (or set {DATA_DIR_ENV}) to a folder holding "
            "wikitext-2/{valid,test}.txt, or `pip install simdiff[data]` to download it"
        ) from exc
    hf_split = {"valid": "validation", "test": "test", "train": "train"}[split]
    rows = datasets.load_dataset("wikitext", config, split=hf_split)
    return "".join(rows["text"])


def load_named_text(name: str, split: str, root: str | os.PathLike | None = None) -> str:
    """Text of a named dataset split (``wikitext2`` or ``wikitext2-tok``, split ``valid`` or ``test``)."""
    folder = data_dir(root)
    folders, config = NAMED_DATASETS[name]
    if folder is not None:
        path = local_text_path(name, split, folder)
        if path is None:
            raise SimdiffError(f"{name}/{split} not found: --data-dir / {DATA_DIR_ENV} ({folder}) must hold "
                               + " or ".join(f"{sub}/{split}.txt" for sub in folders))
        if path.parent.name != folders[0]:
            log.info("%s/%s: no %s/%s.txt in %s; reading %s", name, split, folders[0], split, folder, path)
        return path.read_text(encoding="utf-8")
    log.info("no local data dir; downloading %s/%s with `datasets`", config, split)
    return _wikitext2_from_datasets(split, config)


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
