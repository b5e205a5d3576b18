"""Option fields: a dataclass field that also describes its command-line flag.

Settings dataclasses (calibration, criterion options, evaluation, recovery, benchmark shapes) declare each
field with :func:`option`; :mod:`simdiff.cli.options` turns the fields into flags and :mod:`simdiff.config.recipe`
validates recipes against them. So a setting is defined once: name, type, default, help and choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

_MISSING = dataclasses.MISSING
DATA_DIR_HELP = "folder holding wikitext-2/ and piqa/"
DATA_DIR_SHOWN = "$SIMDIFF_DATA_DIR, else download"


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002 - argparse's name
           choices: Sequence[Any] | None = None, parse: Callable[[str], Any] | None = None,
           default_factory: Callable[[], Any] | None = None, shown: str | None = None) -> Any:
    """A dataclass field with its flag: ``flag`` (default ``--field-name``), ``help``, ``choices``,
    ``parse`` (string -> value; default: the field's type) and ``shown`` (how ``--help`` shows the default)."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None,
                "parse": parse, "shown": shown}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FieldFlag:
    """How one dataclass field appears on the command line."""

    field: str
    flag: str
    help: str
    value_type: Any
    default: Any
    choices: tuple | None = None
    parse: Callable[[str], Any] | None = None
    shown: str | None = None

    @property
    def is_section(self) -> bool:
        """The field holds a whole settings dataclass (a recipe section), not a flag value."""
        return dataclasses.is_dataclass(base_type(self.value_type)[0])

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def field_flags(cls: type, help_fallback: dict[str, str] | None = None) -> list[FieldFlag]:
    """The flag of every field of the dataclass ``cls`` (fields without help text and no fallback raise)."""
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        text = meta.get("help") or (help_fallback or {}).get(f.name)
        if not text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with simdiff.config.flags.option")
        flags.append(FieldFlag(f.name, meta.get("flag") or "--" + f.name.replace("_", "-"), text, hints[f.name],
                               field_default(f), meta.get("choices"), meta.get("parse"), meta.get("shown")))
    return flags


def base_type(value_type: Any) -> tuple[Any, bool]:
    """``(T, is_list)`` for ``T``, ``T | None``, ``list[T]`` and ``list[T] | None``."""
    if typing.get_origin(value_type) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(value_type) if a is not type(None)]
        value_type = args[0] if len(args) == 1 else value_type
    if typing.get_origin(value_type) is list:
        return typing.get_args(value_type)[0], True
    return value_type, False


def number_or_auto(text: str) -> float | str:
    """A number, or ``auto`` (tuned per model and layer count, see simdiff.selection.search)."""
    if is_auto(str(text)):
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def names(text: str) -> list[str]:
    """Comma-separated names (empty items dropped; ``''`` is the empty list)."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def layer_list(text: str) -> list[int]:
    """``--layers``: comma-separated decoder-layer indices, e.g. ``3,12,13``."""
    layers = names(text)
    if not layers or not all(part.isdigit() for part in layers):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,12,13, got {text!r}")
    return [int(part) for part in layers]


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_size(text: str) -> int:
    """A size in bytes from ``40GiB``, ``512MiB``, ``8GB`` or a plain byte count (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 40GiB, 512MiB or 8GB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def comma_list(parse: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """Parser of a comma-separated list of ``what`` (one value is a list of one)."""
    def parse_list(text: str) -> list:
        try:
            return [parse(t) for t in names(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    parse_list.__name__ = f"list of {what}"
    return parse_list


AUTO = "auto"


def is_auto(alpha: object) -> bool:
    """``auto`` (any case, spaces around): the one test for it (--alpha, recipes, criterion specs)."""
    return isinstance(alpha, str) and alpha.strip().lower() == AUTO
