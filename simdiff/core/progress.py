"""Progress bars that the CLI can silence (``-q``) in one place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_enabled = True


def set_progress(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def progress(items: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar on stderr unless progress bars are disabled."""
    return tqdm(items, desc=desc, total=total, disable=not _enabled, leave=leave, dynamic_ncols=True)
