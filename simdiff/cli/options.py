"""The one option vocabulary of the command line, generated from the settings dataclasses.

Every flag comes from a dataclass field declared with :func:`simdiff.config.flags.option` (the recipe sections in
:mod:`simdiff.config.recipe`, :class:`simdiff.config.recover.RecoverConfig`, :class:`simdiff.bench.run.BenchSettings`
and :class:`CommandFlags` below), so a flag has one name, type, help text and meaning in every subcommand;
only its default may differ by command. Adding a setting is one field; every subcommand taking its section
gets the flag. Flags that were renamed fail with a one-line hint (:data:`RENAMED`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from simdiff.config.flags import FieldFlag, base_type, comma_list, field_flags, option
from simdiff.config.recipe import (
    SECTION_TYPES,
    Calibration,
    ModelSettings,
    Recipe,
    SelectionSettings,
    recipe_from_dict,
)
from simdiff.config.settings import Options
from simdiff.core.errors import SimdiffError

SECTION_MARK = "_section_"
RENAMED = {
    "--seq-len": "use --calib-seq-len (calibration), --eval-seq-len (evaluation), --train-seq-len (recover) or "
                 "--prefill-seq-len (bench)",
    "--batch-size": "use --calib-batch-size (calibration), --eval-batch-size (evaluation), --train-batch-size "
                    "(recover) or --prefill-batch-size (bench)",
    "--criteria": "use --criterion (it takes a comma list where a command compares several)",
    "--ratios": "use --ratio (it takes a comma list where a command compares several)",
    "--alpha": "use --lora-alpha for LoRA recovery (--alpha is SimDiff's weight in score, prune, compare, run)",
    "--rank": "use --lora-rank",
    "--dropout": "use --lora-dropout",
    "--eval-max-tokens": "use --max-tokens",
}


@dataclass
class CommandFlags:
    """Flags of single commands that are not settings of a run: extra outputs and what to compare with."""

    json: str | None = option(None, "write the results as JSON to this file")
    plot: str | None = option(None, "write a layer x criterion heatmap of removal ranks to this file "
                                    "(.png/.svg/.pdf)")
    block_size: int | None = option(None, "also collect angular distances of blocks of this many layers")
    baseline: str | None = option(None, "dense model (name/path) or an earlier `simdiff eval --json` file: "
                                         "adds % retained")
    allow_protocol_mismatch: bool = option(False, "accept a --baseline file measured with other windows, tokens, "
                                                  "limit, shots or task versions")


def shown_default(flag: FieldFlag, default: Any) -> str:
    if flag.shown is not None and default == flag.default:  # a command's own default is shown as it is
        return flag.shown
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == []:
        return "none"
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def add_flag(container, flag: FieldFlag, default: Any = None, shown: str | None = None,
             override: bool = False, optional: bool = False) -> None:
    """Add one generated flag. ``override``: the value stays unset unless given (``simdiff run`` overrides);
    ``optional``: a positional that may be omitted."""
    positional = not flag.flag.startswith("-")
    shown = "the recipe's" if override else shown or shown_default(flag, default)
    text = flag.help if positional and not default else f"{flag.help} (default: {shown})"
    text = text.replace("%", "%%")
    kwargs: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS if override else default}
    kind, is_list = base_type(flag.value_type)
    if kind is bool and not is_list:
        kwargs["action"] = "store_true"
    else:
        kwargs["type"] = flag.parse or (comma_list(kind, kind.__name__) if is_list else kind)
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
    if positional:
        container.add_argument(flag.flag, nargs="?" if override or optional or default else None, **kwargs)
    else:
        container.add_argument(flag.flag, dest=flag.dest, **kwargs)


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str | None = None, *,
               only: list[str] | None = None, exclude: tuple[str, ...] = (), defaults: dict | None = None,
               shown: dict | None = None, override: bool = False) -> None:
    """Add the flags of the dataclass ``cls`` (a field whose flag the parser already has is shared, not added)."""
    container = parser.add_argument_group(title) if title else parser
    defaults, shown = defaults or {}, shown or {}
    if not override:  # the command takes this section (recipe_from_args builds it)
        parser.set_defaults(**{SECTION_MARK + cls.__name__: True})
    for flag in field_flags(cls):
        if (only is not None and flag.field not in only) or flag.field in exclude or flag.is_section:
            continue
        if flag.flag in parser._option_string_actions or any(a.dest == flag.flag for a in parser._actions):
            continue
        add_flag(container, flag, defaults.get(flag.field, flag.default), shown.get(flag.field), override,
                 optional=flag.field in defaults)


def section_from(cls: type, args: argparse.Namespace, base=None):
    """The dataclass ``cls`` from parsed flags (fields whose flag was not given keep ``base``'s or defaults)."""
    values = {f.field: getattr(args, f.dest) for f in field_flags(cls) if not f.is_section and hasattr(args, f.dest)}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


# -- the groups the subcommands share ------------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser, offload: bool = False, **kwargs) -> None:
    add_fields(parser, ModelSettings, "model", exclude=() if offload else ("offload", "max_device_memory"), **kwargs)


def add_calibration_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    add_fields(parser, Calibration, "calibration", **kwargs)


def add_criterion_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    add_fields(parser, Options, "criterion options", **kwargs)


def add_selection_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    add_fields(parser, SelectionSettings, "selection", **kwargs)


def add_search_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    """How --alpha auto and --criterion best-of choose on held-out calibration windows (simdiff.selection.search)."""
    from simdiff.config.settings import SearchSettings

    add_fields(parser, SearchSettings, "held-out selection (--alpha auto, --criterion best-of)", **kwargs)


def add_evaluation_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    from simdiff.config.settings import EvalSettings

    add_fields(parser, EvalSettings, "evaluation", **kwargs)


def add_output_options(parser: argparse.ArgumentParser, out: str | None = None,
                       only: tuple[str, ...] = ("out", "overwrite"), **kwargs) -> None:
    """``--out`` and ``--overwrite`` (and ``--export`` where asked); ``--out`` is checked when the command runs,
    so recipes may supply it."""
    add_fields(parser, Recipe, "output", only=list(only), defaults={"out": out},
               shown={"out": "required"} if out is None else None, **kwargs)


def add_command_flags(parser: argparse.ArgumentParser, *names: str, **kwargs) -> None:
    add_fields(parser, CommandFlags, "output", only=list(names), **kwargs)


def options_from(args: argparse.Namespace) -> Options:
    return section_from(Options, args)


def calibration_from(args: argparse.Namespace) -> Calibration:
    return section_from(Calibration, args)


def recipe_from_args(args: argparse.Namespace, base: Recipe | None = None) -> Recipe:
    """The recipe of a command: ``base`` (a loaded recipe, or defaults) with every given flag applied."""
    recipe = base or Recipe()
    sections = {}
    for name, cls in SECTION_TYPES.items():
        current = getattr(recipe, name)
        if current is None and (getattr(args, SECTION_MARK + cls.__name__, False) or _own_flag_given(cls, args)):
            current = cls()
        sections[name] = section_from(cls, args, current) if current is not None else current
    if base is not None:  # a count given on the command line replaces the recipe's (--num-layers, --ratio, --layers)
        counts = ("num_layers", "ratio", "layers")
        given = [name for name in counts if getattr(args, name, None) is not None]
        if given:
            cleared = {name: None for name in counts if name not in given}
            sections["selection"] = dataclasses.replace(sections["selection"], **cleared)
    resolved = section_from(Recipe, args, dataclasses.replace(recipe, **sections))
    return recipe_from_dict(resolved.to_dict())  # validates types and choices of every field


def _own_flag_given(cls: type, args: argparse.Namespace) -> bool:
    """A flag that belongs to section ``cls`` alone was given (``simdiff run`` adding a section)."""
    others = {f.dest for name, other in SECTION_TYPES.items() if other is not cls for f in field_flags(other)}
    return any(hasattr(args, f.dest) for f in field_flags(cls) if f.dest not in others)


# -- flags every subcommand takes --------------------------------------------------------------------
class _Renamed(argparse.Action):
    """A flag that was renamed: one line naming the new flag, exit 2."""

    def __init__(self, option_strings, dest, hint: str = "", **kwargs) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        raise SimdiffError(f"{option_string} was renamed: {self.hint}")


def add_common_flags(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v``/``-q`` (accepted before or after the subcommand) and hints for renamed flags."""
    default = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging and tracebacks (default: off)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="warnings only, no progress bars, model loading included (default: off)")


def add_renamed_hints(parser: argparse.ArgumentParser) -> None:
    """Call after a subcommand's own flags: renamed flags it does not define fail with a hint."""
    for old, hint in RENAMED.items():
        if old not in parser._option_string_actions:
            parser.add_argument(old, action=_Renamed, hint=hint)
