"""Recipes: one typed description of a run (model, calibration, selection, criterion options, evaluation, output).

A recipe is the options object the library passes down (``simdiff.prune(recipe)``), the source of the
command-line flags (:mod:`simdiff.cli_options` generates them from these fields) and a YAML/JSON file
(``simdiff run recipe.yaml``). Every prune writes its fully resolved recipe into ``simdiff.json``, so
``simdiff run out/simdiff.json --out other/`` replays it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simdiff.criteria.registry import Options
from simdiff.data import batches, calibration_windows
from simdiff.data.windows import Batch
from simdiff.errors import SimdiffError
from simdiff.evaluate.suite import EvalSettings
from simdiff.flags import (
    DATA_DIR_HELP,
    DATA_DIR_SHOWN,
    FieldFlag,
    base_type,
    comma_list,
    field_flags,
    layer_list,
    names,
    option,
)
from simdiff.heal import DEFAULT_RIDGE, HEAL_METHODS
from simdiff.model.load import DTYPES
from simdiff.tune import SearchSettings

RECIPE_KEY = "recipe"


@dataclass
class ModelSettings:
    """Which checkpoint to load and where to put it."""

    name: str = option("", "model directory, hub id (org/name), or built-in name (smollm2-135m)", flag="model",
                       shown="required")
    dtype: str = option("auto", "weights' dtype, loaded and saved (statistics are float32 either way)",
                        choices=tuple(DTYPES), shown="auto, the checkpoint's own")
    device: str | None = option(None, "device to run on, e.g. cpu, cuda, cuda:1", shown="cpu")
    device_map: str | None = option(None, "accelerate placement, e.g. auto (several GPUs + CPU)")
    offload: str | None = option(None, "layerwise: keep the model in CPU memory and score it one decoder layer at "
                                       "a time on --device (for models bigger than device memory)",
                                 choices=("layerwise",))
    revision: str | None = option(None, "hub model: branch, tag or commit (a token comes from $HF_TOKEN)",
                                  shown="the default branch")
    trust_remote_code: bool = option(False, "run the model's own Python code (auto_map); only for sources you trust")

    def load(self, name: str | None = None, offloaded: bool = False):
        """``(model, tokenizer)`` of this model (or of ``name``, e.g. its pruned copy) with these settings;
        ``offloaded``: left in CPU memory for layer-wise scoring."""
        from simdiff.model import load_model

        source = {"revision": self.revision} if name is None else {}
        return load_model(name or self.name, self.dtype, None if offloaded else self.device, self.device_map,
                          trust_remote_code=self.trust_remote_code, **source)


@dataclass
class Calibration:
    """Where calibration windows come from."""

    source: str = option("wikitext2", "calibration text: wikitext2 (validation split), or a .txt/.jsonl file or "
                                      "folder", flag="--calib")
    samples: int = option(32, "number of calibration windows")
    seq_len: int = option(256, "tokens per calibration window (BOS included)", flag="--calib-seq-len")
    batch_size: int = option(4, "calibration windows per forward pass", flag="--calib-batch-size")
    seed: int = option(0, Options.__dataclass_fields__["seed"].metadata["help"])
    data_dir: str | None = option(None, DATA_DIR_HELP, shown=DATA_DIR_SHOWN)

    heldout_samples: int = option(32, "held-out windows (cut from the end of the calibration text, disjoint from the "
                                      "scoring windows) for --alpha auto and --criterion best-of")
    skip_first_token: bool = option(False, "leave position 0 of each window (BOS / attention sink) out of the "
                                           "layer statistics")

    def __post_init__(self) -> None:
        """Refuse impossible settings when made, before the model is loaded."""
        for flag, value, least in (("--samples", self.samples, 1), ("--calib-seq-len", self.seq_len, 2),
                                   ("--calib-batch-size", self.batch_size, 1), ("--seed", self.seed, 0)):
            if value < least:
                raise SimdiffError(f"{flag} must be >= {least}, got {value}")

    def batches(self, tokenizer) -> list[Batch]:
        windows = calibration_windows(tokenizer, self.source, self.samples, self.seq_len, self.seed, self.data_dir)
        return batches(windows, self.batch_size, self.skip_first_token)


@dataclass
class SelectionSettings:
    """Which layers go: criterion (or several to compare), how many, which are protected."""

    criterion: str = option("simdiff", "criterion, a variant such as simdiff:alpha=auto, best-of (the best of "
                                       "--pool on held-out windows), or (where a command takes several) a comma "
                                       "list or 'all'")
    num_layers: list[int] | None = option(None, "number of decoder layers to remove (a comma list where a "
                                                "command takes several)", parse=comma_list(int, "integers"))
    ratio: list[float] | None = option(None, "fraction of decoder layers to remove, rounded (a comma list where "
                                             "a command takes several)", parse=comma_list(float, "numbers"))
    layers: list[int] | None = option(None, "remove exactly these layers, e.g. 3,12,13 (the input model's "
                                            "numbering; no scoring)", parse=layer_list)
    iterative: bool = option(False, "re-score after each removal (one layer at a time)")
    keep_first: int = option(0, "never remove the first N layers")
    keep_last: int = option(0, "never remove the last N layers")
    heal: str = option("none", "linear: replace each removed run of layers by a least-squares linear map of the "
                               "calibration activations, folded into the MLP output projection of the layer "
                               "before it (no training, no new parameters; layer 0 is then never removed); "
                               "none: plain removal", choices=HEAL_METHODS)
    heal_ridge: float = option(DEFAULT_RIDGE, "--heal linear's ridge, relative to the mean eigenvalue of M^T M "
                                              "(lambda = ridge * trace(M^T M) / d; 0 = plain least squares)")

    def __post_init__(self) -> None:
        if self.heal_ridge < 0:
            raise SimdiffError(f"--heal-ridge must be >= 0, got {self.heal_ridge}")

    def counts_given(self) -> list:
        return (self.num_layers or []) + (self.ratio or [])


@dataclass
class Recipe:
    """A whole run. ``evaluation`` is optional: when given, ``simdiff run`` evaluates the result too."""

    model: ModelSettings = option(help="the checkpoint and its placement", default_factory=ModelSettings)
    calibration: Calibration = option(help="calibration windows", default_factory=Calibration)
    selection: SelectionSettings = option(help="which layers go", default_factory=SelectionSettings)
    options: Options = option(help="criterion options", default_factory=Options)
    search: SearchSettings = option(help="held-out selection (--alpha auto, --criterion best-of)",
                                    default_factory=SearchSettings)
    evaluation: EvalSettings | None = option(None, "what to measure after pruning (none: no evaluation)")
    out: str | None = option(None, "output folder, or .gguf file for a GGUF input (written atomically)")
    overwrite: bool = option(False, "replace an existing output (a previous simdiff output)")
    export: str | None = option(None, "gguf: also write the model's GGUF file without the removed layers as "
                                      "OUT/pruned.gguf (quantized tensors byte-identical; built-in models only)",
                                choices=("gguf",))

    def to_dict(self) -> dict:
        return asdict(self)

    def criteria(self) -> list[str]:
        """The criterion specs, ``all`` expanded."""
        from simdiff.criteria import CRITERIA

        text = self.selection.criterion.strip()
        return list(CRITERIA) if text == "all" else names(text)

    def is_comparison(self) -> bool:
        """Several criteria or counts: a comparison (``simdiff compare``) rather than one prune."""
        return len(self.criteria()) > 1 or len(self.selection.counts_given()) > 1

    def check(self) -> Recipe:
        """Semantic checks that need no model; raises :class:`SimdiffError` naming the field."""
        from simdiff.compare import parse_candidates

        if not self.model.name:
            raise SimdiffError("recipe field model.name is empty; name a model directory, hub id or smollm2-135m")
        parse_candidates(self.selection.criterion)
        sel = self.selection
        if sum(value is not None for value in (sel.num_layers, sel.ratio, sel.layers)) != 1:
            raise SimdiffError("give exactly one of --num-layers K, --ratio R or --layers 3,12,13 (recipe: "
                               "selection.num_layers, selection.ratio or selection.layers)")
        if self.is_comparison() and self.evaluation is None:
            raise SimdiffError("a recipe with several criteria or counts is a comparison: add an evaluation section")
        return self


SECTION_TYPES: dict[str, type] = {"model": ModelSettings, "calibration": Calibration,
                                  "selection": SelectionSettings, "options": Options, "search": SearchSettings,
                                  "evaluation": EvalSettings}


def _type_name(flag: FieldFlag) -> str:
    kind, is_list = base_type(flag.value_type)
    name = getattr(kind, "__name__", str(kind)).replace(" | ", " or ")
    return f"a list of {name}" if is_list else name


def _parse_text(flag: FieldFlag, text: str, where: str) -> Any:
    """A string value read the way its flag reads it (``'4,8'``, ``'auto'``)."""
    try:
        return flag.parse(text)
    except Exception:  # noqa: BLE001 - argparse.ArgumentTypeError and ValueError alike
        raise SimdiffError(f"recipe field {where}: cannot read {text!r} as {_type_name(flag)}") from None


_IS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
       float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
       bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}


def _coerce_one(flag: FieldFlag, kind: Any, value: Any, where: str) -> Any:
    if flag.parse is not None and (isinstance(value, str) or kind not in _IS):  # e.g. alpha: a number or 'auto'
        return _parse_text(flag, str(value), where)
    if kind in _IS and not _IS[kind](value):
        raise SimdiffError(f"recipe field {where}: expected {_type_name(flag)}, got {value!r}")
    return float(value) if kind is float else value


def coerce(flag: FieldFlag, value: Any, where: str) -> Any:
    """``value`` as the field's type (a scalar or comma string becomes a list where a list is expected)."""
    if value is None:
        if flag.default is None:
            return None
        raise SimdiffError(f"recipe field {where} may not be empty (default: {flag.default!r})")
    kind, is_list = base_type(flag.value_type)
    if is_list and isinstance(value, str):
        result = _parse_text(flag, value, where)
    elif is_list:
        element = dataclasses.replace(flag, parse=None)
        result = [_coerce_one(element, kind, v, where) for v in (value if isinstance(value, list) else [value])]
    else:
        result = _coerce_one(flag, kind, value, where)
    for item in result if is_list else [result]:
        if flag.choices is not None and item not in flag.choices:
            raise SimdiffError(f"recipe field {where}: {item!r} is not one of {', '.join(map(str, flag.choices))}")
    return result


def section_from_dict(cls: type, data: Any, where: str):
    """Build the dataclass ``cls`` from a mapping, naming unknown or mistyped fields."""
    flags = checked_fields(cls, data, where)
    return cls(**{key: coerce(flags[key], value, f"{where}.{key}") for key, value in data.items()})


def checked_fields(cls: type, data: Any, where: str | None) -> dict:
    """The flags of ``cls``'s fields, after checking that ``data`` is a mapping of those fields only
    (``where``: the section's name, None for the top level)."""
    flags = {f.field: f for f in field_flags(cls)}
    what = "a recipe" if where is None else f"recipe field {where}"
    if not isinstance(data, dict):
        raise SimdiffError(f"{what} must be a mapping with keys {', '.join(flags)}, got {type(data).__name__}")
    unknown = [key for key in data if key not in flags]
    if unknown:
        name = repr(unknown[0]) if where is None else f"{where}.{unknown[0]}"
        raise SimdiffError(f"unknown recipe field {name}; allowed: {', '.join(flags)}")
    return flags


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a recipe mapping (as read from YAML/JSON, or a ``simdiff.json`` holding one under 'recipe')."""
    if isinstance(data, dict) and isinstance(data.get(RECIPE_KEY), dict):
        data = data[RECIPE_KEY]
    top = checked_fields(Recipe, data, None)
    kwargs = {}
    for key, value in data.items():
        if key in SECTION_TYPES:
            kwargs[key] = None if value is None and key == "evaluation" else \
                section_from_dict(SECTION_TYPES[key], value if value is not None else {}, key)
        else:
            kwargs[key] = coerce(top[key], value, key)
    return Recipe(**kwargs)


def load_recipe(path: str | Path) -> Recipe:
    """Read a ``.yaml``/``.yml``/``.json`` recipe (or a prune's ``simdiff.json``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SimdiffError(f"recipe {str(path)!r} not found (give a .yaml or .json recipe, or a simdiff.json)")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SimdiffError(f"recipe {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                           f"{str(exc).splitlines()[0]}") from None
    return recipe_from_dict(data)


def dump_recipe(recipe: Recipe | dict) -> str:
    """The recipe as YAML (every field, defaults included)."""
    import yaml

    return yaml.safe_dump(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, sort_keys=False)


def recipe_from_settings(model: str, out: str | Path | None = None, **settings: Any) -> Recipe:
    """A recipe from keyword arguments: whole sections (``calibration=Calibration(...)``) or single fields of
    any section (``ratio=0.25``, ``dtype="bfloat16"``); list fields accept a single value."""
    recipe = Recipe(model=ModelSettings(name=model), out=None if out is None else str(out))
    owners: dict[str, list[str]] = {}
    for name, cls in SECTION_TYPES.items():
        for f in field_flags(cls):
            owners.setdefault(f.field, []).append(name)
    for key, value in settings.items():
        if key in SECTION_TYPES:
            if value is not None:
                setattr(recipe, key, value)
        elif key == "overwrite":
            recipe.overwrite = bool(value)
        elif key == "seed":
            recipe.calibration.seed = recipe.options.seed = int(value)
        elif len(owners.get(key, [])) == 1:
            _set_field(recipe, owners[key][0], key, value)
        elif key in owners:
            raise SimdiffError(f"setting {key!r} is ambiguous ({' or '.join(owners[key])}); pass the section, "
                               f"e.g. calibration=Calibration({key}=...)")
        else:
            raise SimdiffError(f"unknown setting {key!r}; use a section ({', '.join(SECTION_TYPES)}) or one of "
                               f"{', '.join(sorted(k for k, v in owners.items() if len(v) == 1))}")
    return recipe


def _set_field(recipe: Recipe, section_name: str, key: str, value: Any) -> None:
    section = getattr(recipe, section_name)
    if section is None:
        section = SECTION_TYPES[section_name]()
        setattr(recipe, section_name, section)
    flag = next(f for f in field_flags(type(section)) if f.field == key)
    setattr(section, key, coerce(flag, value, f"{section_name}.{key}"))
