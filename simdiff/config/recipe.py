"""Recipes: one typed description of a run (model, calibration, selection, criterion options, evaluation, output).

A recipe is the options object the library passes down (``simdiff.prune(recipe)``), the source of the
command-line flags (:mod:`simdiff.cli.options` generates them from these fields) and a YAML/JSON file
(``simdiff run recipe.yaml``). Every prune writes its fully resolved recipe into ``simdiff.json``, so
``simdiff run out/simdiff.json --out other/`` replays it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simdiff.config.flags import (
    DATA_DIR_HELP,
    DATA_DIR_SHOWN,
    FieldFlag,
    base_type,
    comma_list,
    field_flags,
    layer_list,
    memory_size,
    names,
    option,
)
from simdiff.config.settings import (
    DEFAULT_HEAL_SAMPLES,
    DEFAULT_HEAL_WEIGHTING,
    DEFAULT_RIDGE,
    DTYPE_NAMES,
    HEAL_METHODS,
    HEAL_WEIGHTINGS,
    EvalSettings,
    Options,
    SearchSettings,
)
from simdiff.core.errors import SimdiffError

RECIPE_KEY = "recipe"
MIN_HELDOUT = 2


@dataclass
class ModelSettings:
    """Which checkpoint to load and where to put it."""

    name: str = option("", "model directory, hub id (org/name), or built-in name (smollm2-135m)", flag="model",
                       shown="required")
    dtype: str = option("auto", "weights' dtype, loaded and saved (statistics are float32 either way)",
                        choices=DTYPE_NAMES, shown="auto, the checkpoint's own")
    device: str | None = option(None, "device to run on, e.g. cpu, cuda, cuda:1", shown="cpu")
    device_map: str | None = option(None, "accelerate placement, e.g. auto (several GPUs + CPU)")
    offload: str | None = option(None, "layerwise: keep the model in CPU memory and score it one decoder layer at "
                                       "a time on --device (for models bigger than device memory)",
                                 choices=("layerwise",))
    max_device_memory: int | None = option(None, "with --offload layerwise: device-memory budget, e.g. 40GiB or "
                                                 "512MiB; refused before the calibration pass if one layer plus the "
                                                 "activations would not fit", parse=memory_size, shown="no limit")
    revision: str | None = option(None, "hub model: branch, tag or commit (a token comes from $HF_TOKEN)",
                                  shown="the default branch")
    trust_remote_code: bool = option(False, "run the model's own Python code (auto_map); only for sources you trust")

    def __post_init__(self) -> None:
        """Refuse impossible settings when made, before the model is loaded."""
        if self.max_device_memory is None:
            return
        if self.max_device_memory <= 0:
            raise SimdiffError(f"--max-device-memory must be a positive size such as 40GiB, got {self.max_device_memory}")
        if self.offload != "layerwise":
            raise SimdiffError("--max-device-memory is the device budget of --offload layerwise; add --offload "
                               "layerwise or drop --max-device-memory")

    def offload_device(self) -> str | None:
        """The device layer-wise offload scores on (None without ``--offload layerwise``)."""
        return (self.device or "cpu") if self.offload == "layerwise" else None


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

    heldout_samples: int = option(32, "held-out windows (cut from the calibration text in --heldout-blocks blocks, "
                                      "disjoint from the scoring windows) for --alpha auto and --criterion best-of; "
                                      "at least 2 (the --margin test needs a paired standard error)")
    heldout_blocks: int = option(8, "contiguous blocks the held-out windows are split into, spread evenly over the "
                                    "calibration text (first at its start, last at its end; scoring windows come from "
                                    "the gaps); the --margin standard error is taken over blocks (at most "
                                    "--heldout-samples blocks)")
    skip_first_token: bool = option(False, "leave position 0 of each window (BOS / attention sink) out of the "
                                           "layer statistics")

    def __post_init__(self) -> None:
        """Refuse impossible settings when made, before the model is loaded."""
        self.check()

    def check(self) -> Calibration:
        for flag, value, least in (("--samples", self.samples, 1), ("--calib-seq-len", self.seq_len, 2),
                                   ("--calib-batch-size", self.batch_size, 1), ("--seed", self.seed, 0),
                                   ("--heldout-samples", self.heldout_samples, MIN_HELDOUT),
                                   ("--heldout-blocks", self.heldout_blocks, MIN_HELDOUT)):
            if value < least:
                unit = "blocks" if flag == "--heldout-blocks" else "windows"
                why = f" (the --margin test's paired standard error needs two {unit})" if least == MIN_HELDOUT else ""
                raise SimdiffError(f"{flag} must be >= {least}{why}, got {value}")
        return self



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
    slice_config_keys: list[str] = option(
        help="config keys (comma list) holding one entry per layer besides those simdiff knows (layer_types, "
             "mlp_only_layers, ...): sliced with the layers; an unknown list as long as the layer count is refused",
        flag="--slice-config-key", parse=names, default_factory=list)
    heal: str = option("none", "linear: replace each removed run of layers by a least-squares linear map of the "
                               "calibration activations, folded into the MLP output projection of the layer "
                               "before it (no training, no new parameters; layer 0 is then never removed); it "
                               "adapts the kept layers to the calibration text, so calibrate on text like the "
                               "model's use; none: plain removal", choices=HEAL_METHODS)
    heal_ridge: float = option(DEFAULT_RIDGE, "--heal linear's ridge, relative to the mean eigenvalue of M^T W M "
                                              "(lambda = ridge * trace(M^T W M) / d, W the token weights; 0 = "
                                              "plain least squares)")
    heal_samples: int = option(DEFAULT_HEAL_SAMPLES, "calibration windows (of --calib-seq-len tokens, from the "
                                                     "--calib text with --seed) --heal linear fits its maps on: a "
                                                     "d x d map per run needs far more tokens than the scores do")
    heal_weighting: str = option(DEFAULT_HEAL_WEIGHTING, "--heal linear's token weights: relative (each token's "
                                                         "error divided by its residual's squared norm, so the "
                                                         "attention-sink token does not carry the fit) or uniform "
                                                         "(plain least squares)", choices=HEAL_WEIGHTINGS)

    def __post_init__(self) -> None:
        self.check_heal()

    def check_heal(self) -> None:
        if not self.heal_ridge >= 0:
            raise SimdiffError(f"--heal-ridge must be a number >= 0, got {self.heal_ridge}")
        if self.heal_samples < 1:
            raise SimdiffError(f"--heal-samples must be at least 1, got {self.heal_samples}")

    def counts_given(self) -> list:
        return (self.num_layers or []) + (self.ratio or [])

    def check(self) -> SelectionSettings:
        """Ranges that need no model: counts >= 1, ratios in (0, 1), protected counts >= 0."""
        for count in self.num_layers or []:
            if count < 1:
                raise SimdiffError(f"--num-layers asks to remove {count} layers; remove at least 1")
        for ratio in self.ratio or []:
            if not 0.0 < ratio < 1.0:
                raise SimdiffError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
        if self.keep_first < 0 or self.keep_last < 0:
            raise SimdiffError(f"--keep-first/--keep-last must be >= 0, got {self.keep_first}/{self.keep_last}")
        self.check_heal()
        return self


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
        from simdiff.selection.spec import criterion_names  # the one spec parser, lazily (no torch)

        return criterion_names(self.selection.criterion)

    def is_comparison(self) -> bool:
        """Several criteria or counts: a comparison (``simdiff compare``) rather than one prune."""
        return len(self.criteria()) > 1 or len(self.selection.counts_given()) > 1

    def check_settings(self) -> Recipe:
        """Every field's type and choices (as a recipe file is read) and each section's ranges, however the recipe
        was made (CLI flags, a recipe file, or the Python API setting fields after construction)."""
        from simdiff.data.text import NAMED_DATASETS, text_files  # lazily: reads no data, imports no torch

        for name, cls in SECTION_TYPES.items():
            value = getattr(self, name)
            if not (isinstance(value, cls) or (value is None and name == "evaluation")):
                raise SimdiffError(f"recipe field {name} must be a {cls.__name__}, got {type(value).__name__}")
        recipe_from_dict(self.to_dict())
        self.calibration.check()
        self.options.check()
        self.selection.check()
        self.search.check()
        if self.evaluation is not None:
            self.evaluation.check()
        calibrated = [self.calibration.source] if self.selection.layers is None else []  # --layers: no calibration
        for source in [*calibrated, *(self.evaluation.ppl if self.evaluation is not None else [])]:
            if source not in NAMED_DATASETS:
                text_files(source)  # the file or folder exists and holds .txt/.jsonl text
        name, revision = self.model.name, self.model.revision
        if revision and name and Path(name).expanduser().is_dir():
            raise SimdiffError(f"--revision {revision!r} applies to hub ids; {name!r} is a local directory")
        self.check_offload()
        return self

    def check_offload(self) -> None:
        """Layer-wise offload collects hidden-state statistics in one pass: no re-scoring, no other evidence."""
        from simdiff.criteria.registry import CRITERIA, LAYER_STATS  # lazily (no torch)
        from simdiff.selection.spec import parse_candidates

        if self.model.offload is None or self.selection.layers is not None:
            return
        if self.selection.iterative:
            raise SimdiffError("--offload layerwise supports one-shot selection only; drop --iterative or --offload")
        for spec in parse_candidates(self.selection.criterion):
            extra = CRITERIA[spec.criterion].needs - {LAYER_STATS} if spec.criterion in CRITERIA else set()
            if extra:
                raise SimdiffError(f"--offload layerwise collects hidden-state statistics only; {spec.criterion} "
                                   f"needs {', '.join(sorted(extra))}, with the model in memory (drop --offload)")

    def check(self) -> Recipe:
        """The one validation of a run, before any model is loaded (``prune``, ``compare``, ``run`` and the API):
        :meth:`check_settings`, then the rules across fields; raises :class:`SimdiffError` naming the field."""
        from simdiff.selection.spec import parse_candidates  # the registry, lazily (no torch)

        self.check_settings()
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
        data = _heal_as_saved(data[RECIPE_KEY])
    top = checked_fields(Recipe, data, None)
    kwargs = {}
    for key, value in data.items():
        if key in SECTION_TYPES:
            kwargs[key] = None if value is None and key == "evaluation" else \
                section_from_dict(SECTION_TYPES[key], value if value is not None else {}, key)
        else:
            kwargs[key] = coerce(top[key], value, key)
    return Recipe(**kwargs)


def _heal_as_saved(recipe: dict) -> dict:
    """A ``simdiff.json`` saved before ``--heal-samples`` existed fitted its heal on the calibration windows, and
    one saved before ``--heal-weighting`` by plain least squares: its replay does the same (a recipe written by
    hand takes the defaults)."""
    selection, calibration = recipe.get("selection"), recipe.get("calibration")
    if not isinstance(selection, dict) or selection.get("heal", "none") == "none":
        return recipe
    as_saved = {"heal_weighting": "uniform"}
    if "heal_samples" not in selection:
        samples = calibration.get("samples") if isinstance(calibration, dict) else None
        as_saved["heal_samples"] = samples or Calibration.samples
    return {**recipe, "selection": {**as_saved, **selection}}


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
