"""Text sources: WikiText-2 by name (local copy or `datasets`), or .txt/.jsonl files and folders.

``wikitext2`` is the **raw** WikiText-2 (``wikitext-2-raw-v1``: the text papers report perplexity on), offline
and online. Offline, the test split is ``wikitext-2-raw/test.txt``. A raw validation split is read from
``wikitext-2-raw/valid.txt`` when the data folder has one; the shared data folder has none, so calibration
then falls back to the tokenised release's ``wikitext-2/valid.txt`` and says so in the recorded variant
(:func:`text_variant`). ``wikitext2-tok`` names the tokenised release (``<unk>``, `` @-@ ``) explicitly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from simdiff.core.errors import SimdiffError, one_line

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
    try:
        rows = datasets.load_dataset("wikitext", config, split=hf_split)
    except ConnectionError as exc:  # offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) or no network, and not cached
        raise SimdiffError(
            f"WikiText-2 is not available: no --data-dir (or {DATA_DIR_ENV}) and the download failed "
            f"({one_line(str(exc))}); pass --data-dir to a folder holding wikitext-2/{{valid,test}}.txt "
            "(and wikitext-2-raw/test.txt, the raw test split)"
        ) from exc
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


def _jsonl_text(path: Path, number: int, line: str) -> str:
    """The non-empty string in the ``text`` field of line ``number`` of a .jsonl file."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SimdiffError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
    if not isinstance(row, dict) or "text" not in row:
        raise SimdiffError(f"{path}:{number} has no 'text' field; each line must be {{\"text\": ...}}")
    text = row["text"]
    if not isinstance(text, str):
        raise SimdiffError(f"{path}:{number}: 'text' is {json.dumps(text)[:20]}, not a string; give the line's text "
                           "or drop the line")
    if not text.strip():
        raise SimdiffError(f"{path}:{number}: 'text' is empty; give the line's text or drop the line")
    return text


def read_text_file(path: Path) -> str:
    """The text of a .txt file, or the ``text`` fields of a .jsonl file joined by blank lines (UTF-8 only)."""
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                texts = [_jsonl_text(path, number, line) for number, line in enumerate(handle, 1) if line.strip()]
            text = "\n\n".join(texts)
        else:
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SimdiffError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it to UTF-8 "
                           "(e.g. iconv -t utf-8) or remove binary files from the data") from exc
    if "\x00" in text:
        raise SimdiffError(f"{path} holds NUL bytes: it looks like a binary file, not text")
    return text


def text_files(source: str) -> list[Path]:
    """The .txt/.jsonl files a path names: the file itself, or those under a folder in sorted order."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"} and p.is_file())
        if not files:
            raise SimdiffError(f"folder {source!r} holds no .txt or .jsonl files")
        return files
    if path.is_file():
        if path.suffix not in {".txt", ".jsonl"}:
            raise SimdiffError(f"{source!r}: expected a .txt or .jsonl file, got {path.suffix or 'no suffix'!r}")
        return [path]
    raise SimdiffError(
        f"text source {source!r} not found: use one of {', '.join(NAMED_DATASETS)} or a path to a "
        ".txt/.jsonl file or folder"
    )


def load_text(source: str, split: str = "valid", root: str | os.PathLike | None = None) -> str:
    """Text from a dataset name, a .txt/.jsonl file, or a folder of them (read in sorted order)."""
    if source in NAMED_DATASETS:
        return load_named_text(source, split, root)
    return "\n\n".join(read_text_file(p) for p in text_files(source))


def text_digest(text: str) -> str:
    """SHA-256 of a text with its surrounding whitespace stripped: equal texts have equal digests."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()
