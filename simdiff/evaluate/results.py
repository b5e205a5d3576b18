"""``simdiff eval`` results in lm-evaluation-harness's schema, with perplexity and provenance added.

The document has lm-eval 0.4's top-level keys (``results``, ``group_subtasks``, ``configs``, ``versions``,
``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, ``git_hash``, ``date``, ...), so lm-eval's
tooling reads it: ``results[task]["acc,none"]``, ``["acc_stderr,none"]``, ``alias``. Local task copies
(``piqa_local``) appear under their standard name (``piqa``). Each perplexity source is one more entry of
``results`` in the same style (``token_perplexity,none`` and ``token_perplexity_stderr,none``: perplexity per
token of the evaluated model's tokenizer, not lm-eval's word perplexity). Our own record (settings, the
per-source reports, the baseline, % retained, versions and the command) is the ``simdiff`` block.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
from pathlib import Path

from simdiff.core.errors import SimdiffError

PERPLEXITY_VERSION = 1.0
PERPLEXITY_METRIC = "token_perplexity"
FILTER = "none"
PER_TASK_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _renamed(table: dict, names: dict[str, str]) -> dict:
    """``table`` with lm-eval task names replaced by the names results are reported under."""
    out = {}
    for key, value in table.items():
        if isinstance(value, list):  # group_subtasks: group -> [task, ...]
            value = [names.get(v, v) for v in value]
        out[names.get(key, key)] = value
    return out


def task_tables(lm_output: dict, tasks: dict[str, dict]) -> dict:
    """lm-eval's per-task tables with local task copies renamed to the standard task name."""
    names = {scores["lm_eval_task"]: task for task, scores in tasks.items() if "lm_eval_task" in scores}
    tables = {key: _renamed(lm_output.get(key, {}), names) for key in PER_TASK_KEYS}
    for lm_name, task in names.items():
        if task in tables["results"]:
            tables["results"][task] = {**tables["results"][task], "name": task, "alias": task}
        if task in tables["configs"] and lm_name != task:
            tables["configs"][task] = {**tables["configs"][task], "simdiff_local_copy_of": task}
    return tables


def _finite_or_na(value: float | None) -> float | str:
    return value if value is not None and math.isfinite(value) else "N/A"


def _add_perplexity(tables: dict, source: str, report: dict) -> None:
    """One ``results`` entry (and its config, version, n-shot, ...) per perplexity source."""
    metric = f"{PERPLEXITY_METRIC},{FILTER}"
    stderr = f"{PERPLEXITY_METRIC}_stderr,{FILTER}"
    tables["results"][source] = {"name": source, "alias": source, metric: report["perplexity"],
                                 stderr: _finite_or_na(report.get("perplexity_stderr"))}
    tables["configs"][source] = {
        "task": source, "output_type": "loglikelihood_rolling", "dataset_path": source,
        "test_split": report["protocol"].get("split"), "num_fewshot": 0, "protocol": report["protocol"],
        "metric_list": [{"metric": PERPLEXITY_METRIC, "aggregation": "exp(summed NLL / predicted tokens)",
                         "higher_is_better": False}],
        "metadata": {"version": PERPLEXITY_VERSION, "measured_by": "simdiff"},
    }
    tables["versions"][source] = PERPLEXITY_VERSION
    tables["n-shot"][source] = 0
    tables["higher_is_better"][source] = {PERPLEXITY_METRIC: False}
    tables["n-samples"][source] = {"original": report["windows"], "effective": report["windows"],
                                   "tokens": report["tokens"]}


def lm_eval_document(model_name: str, result: dict, settings, lm_output: dict, record: dict) -> dict:
    """The results document: lm-eval's schema for ``result`` (tasks and perplexity), ``record`` as ``simdiff``.

    ``lm_output`` is lm-eval's own ``simple_evaluate`` output for the tasks (empty when none ran).
    """
    tables = task_tables(lm_output, result["tasks"])
    for source, report in result["perplexity"].items():
        _add_perplexity(tables, source, report)
    config = {**lm_output.get("config", {}), "model": model_name, "model_args": None, "limit": settings.limit,
              "num_fewshot": settings.num_fewshot}
    extras = {k: v for k, v in lm_output.items() if k not in (*PER_TASK_KEYS, "config", "samples")}
    return {**tables, "config": config, "git_hash": None, "date": time.time(), **extras,
            **_tracker_fields(model_name, result.get("eval_seconds")), "simdiff": record}


def _tracker_fields(model_name: str, seconds: float | None) -> dict:
    """The keys lm-eval's EvaluationTracker adds to a results file (its GeneralConfigTracker, task_hashes)."""
    return {
        "task_hashes": {},
        "model_source": "simdiff",
        "model_name": model_name,
        "model_name_sanitized": re.sub(r"[\"<>:/|\\?*\[\]]+", "__", model_name),  # as lm-eval sanitizes
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": None,
        "chat_template": None,
        "chat_template_sha": None,
        "total_evaluation_time_seconds": str(seconds) if seconds is not None else None,
    }


def protocol_of(record: dict) -> dict:
    """What must match for two evaluations to be compared: windows, tokens, limit, shots, task versions."""
    settings = record.get("settings", {})
    return {
        "eval window (--eval-seq-len)": settings.get("seq_len"),
        "--max-tokens": settings.get("max_tokens"),
        "--limit": settings.get("limit"),
        "--num-fewshot": settings.get("num_fewshot"),
        "perplexity tokens": {s: r.get("tokens") for s, r in record.get("perplexity", {}).items()},
        "perplexity text": {s: r.get("protocol", {}).get("text") for s, r in record.get("perplexity", {}).items()},
        "task versions": dict(record.get("task_versions", {})),
    }


def protocol_differences(baseline: dict, current: dict, settings_only: bool = False) -> list[str]:
    """``field: baseline X, this run Y`` for each protocol field that differs (dict fields: common keys).

    ``settings_only`` compares what is known before evaluating (windows, tokens asked for, limit, shots).
    """
    mine, theirs = protocol_of(current), protocol_of(baseline)
    out = []
    for name, value in mine.items():
        other = theirs[name]
        if isinstance(value, dict):
            if settings_only:
                continue
            out += [f"{name} of {key}: baseline {other[key]}, this run {value[key]}"
                    for key in value if key in other and other[key] != value[key]]
        elif value != other:
            out.append(f"{name}: baseline {other}, this run {value}")
    return out


def check_same_protocol(baseline: dict, current: dict, where: str, settings_only: bool = False) -> None:
    """Refuse a baseline measured differently, naming every differing field in one line."""
    differences = protocol_differences(baseline, current, settings_only)
    if differences:
        raise SimdiffError(f"baseline {where} was measured with a different protocol ({'; '.join(differences)}); "
                           "evaluate both the same way, or pass --allow-protocol-mismatch")


def read_baseline(path: str) -> dict:
    """The simdiff record of an earlier ``simdiff eval --json`` file (this schema or the older flat one),
    read (and refused when unusable) before any evaluation."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimdiffError(f"--baseline {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SimdiffError(f"--baseline {path!r} cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise SimdiffError(f"--baseline {path!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    record = document.get("simdiff", document) if isinstance(document, dict) else None
    sections = ("perplexity", "tasks")
    if not (isinstance(record, dict) and set(sections) & set(record)
            and all(isinstance(record.get(name, {}), dict) for name in sections)):
        raise SimdiffError(f"--baseline {path!r} is not a `simdiff eval --json` result (no perplexity/tasks)")
    return record


def samples_date() -> str:
    """The timestamp lm-eval puts in result and sample file names."""
    return datetime.datetime.now().isoformat().replace(":", "-")


def write_samples(results_path: Path, samples: dict[str, list], tasks: dict[str, dict], date: str,
                  overwrite: bool = False, inputs=()) -> list[Path]:
    """Per-question records as lm-eval writes them: ``samples_<task>_<date>.jsonl`` beside the results file.

    lm-eval writes them into a scratch folder; each is then put in place under the output contract.
    """
    from lm_eval.loggers import EvaluationTracker

    from simdiff.core.outputs import atomic_file, scratch_folder

    names = {scores.get("lm_eval_task", task): task for task, scores in tasks.items()}
    written = []
    with scratch_folder(results_path) as scratch:
        tracker = EvaluationTracker(output_path=str(scratch / results_path.with_suffix(".json").name))
        tracker.date_id = date  # set by save_results_aggregated, which we do not call: we write the results ourselves
        for lm_name, records in samples.items():
            task = names.get(lm_name, lm_name)
            tracker.save_results_samples(task_name=task, samples=records)
            name = f"samples_{task}_{date}.jsonl"
            if not (scratch / name).is_file():
                raise SimdiffError(f"lm-eval did not write {name}; check that the folder is writable")
            path = results_path.parent / name
            with atomic_file(path, overwrite, inputs, (".jsonl",), "--log-samples") as tmp:
                os.replace(scratch / name, tmp)
            written.append(path)
    return written
