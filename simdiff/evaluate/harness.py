"""Zero-shot tasks through lm-evaluation-harness, on the in-memory model (pruned candidates need no saving).

Standard task names are passed to lm-eval unchanged. Tasks shipped in ``simdiff/evaluate/tasks`` read
local copies instead of downloading: ``piqa`` runs as ``piqa_local`` whenever the data folder
(``--data-dir`` / ``$SIMDIFF_DATA_DIR``) holds ``piqa/valid.jsonl``; results keep the name ``piqa``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from simdiff.core.errors import SimdiffError, did_you_mean, one_line
from simdiff.data.text import data_dir as resolve_data_dir
from simdiff.model.hub import datasets_offline

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# standard name -> (local task name, file that must exist under the data folder)
LOCAL_TASKS = {"piqa": ("piqa_local", "piqa/valid.jsonl")}
METRICS = ("acc", "acc_norm")


def parse_tasks(value: str | Sequence[str] | None) -> list[str]:
    """Task names from a comma-separated string (empty -> none)."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    return [n.strip() for n in names if n.strip()]


def local_task_names(tasks: Sequence[str], data_dir: str | None = None) -> dict[str, str]:
    """Map each requested task to the lm-eval task that runs it (a local copy where one is available)."""
    folder = resolve_data_dir(data_dir)
    mapping = {}
    for task in tasks:
        local = LOCAL_TASKS.get(task)
        if local and folder is not None and (folder / local[1]).is_file():
            mapping[task] = local[0]
        else:
            mapping[task] = task
    return mapping


def missing_task_data(task: str, why: str) -> str:
    """The error for a task whose dataset is neither cached nor downloadable, and how to provide it."""
    local = f", or put {LOCAL_TASKS[task][1]} under --data-dir" if task in LOCAL_TASKS else ""
    return (f"lm-eval task {task!r} needs its dataset, which is not in the Hugging Face datasets cache, and {why}: "
            f"run it once online to cache the data (or point HF_DATASETS_CACHE at a cache that has it){local}")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SimdiffError("zero-shot tasks need lm-evaluation-harness: pip install 'simdiff[eval]'") from exc
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=4)
def task_manager(data_dir: str | None):
    """lm-eval's task index with the shipped local tasks (built once per process: it scans every task file)."""
    _, _, manager = _import_lm_eval()
    return manager(include_path=str(TASKS_DIR), metadata={"data_dir": data_dir})


def _quiet_git_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without git's ``fatal: not a git repository`` on stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)  # noqa: S607
        return found.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git() -> Iterator[None]:
    """While lm-eval runs, its git-hash lookup keeps git's stderr to itself (lm-eval's files are untouched).

    ``simple_evaluate`` runs ``git describe`` with the terminal as stderr, which prints ``fatal: not a git
    repository`` outside a checkout; no environment variable silences git, so the module-level name that
    ``simple_evaluate`` calls is swapped for the same lookup with stderr captured, and restored afterwards.
    """
    from lm_eval import evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


class TaskRunner:
    """Runs lm-eval tasks on one loaded model; build it once, call it for every candidate.

    After each call, ``last_output`` holds lm-eval's own ``simple_evaluate`` result (``results``, ``configs``,
    ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, and ``samples`` when
    ``log_samples``), keyed by the lm-eval task names in ``names``.
    """

    def __init__(self, model: nn.Module, tokenizer, tasks: Sequence[str], limit: int | float | None = None,
                 batch_size: int = 8, data_dir: str | None = None, max_length: int | None = None,
                 num_fewshot: int | None = None, log_samples: bool = False) -> None:
        lm_eval, hflm, _ = _import_lm_eval()
        self.tasks = list(tasks)
        self.names = local_task_names(self.tasks, data_dir)
        folder = resolve_data_dir(data_dir)
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.log_samples = log_samples
        self.last_output: dict = {}
        self._lm_eval = lm_eval
        self._manager = task_manager(str(folder) if folder else None)
        self._check_names()
        if datasets_offline():
            self._check_cached_data()
        self._lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

    def _check_names(self) -> None:
        known = set(self._manager.all_tasks)
        for task, name in self.names.items():
            if name not in known:
                raise SimdiffError(f"unknown lm-eval task {task!r}.{did_you_mean(task, sorted(known))} "
                                   "(see `lm-eval ls tasks`)")

    def _check_cached_data(self) -> None:
        """Offline, each standard task's dataset must be in the datasets cache: build the tasks now to know."""
        for task, name in self.names.items():
            if name != task:
                continue  # a shipped local task reading --data-dir
            try:
                self._manager.load(name)
            except ConnectionError as exc:
                why = "downloads are off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
                raise SimdiffError(missing_task_data(task, why)) from exc

    def __call__(self) -> dict[str, dict]:
        """``{task: {"acc": .., "acc_norm": .., "acc_stderr": .., "samples": n, "lm_eval_task": name}}``."""
        if not self.tasks:
            return {}
        if not log.isEnabledFor(logging.DEBUG):  # lm-eval's per-task notices drown the results
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
        try:
            with quiet_git():
                out = self._lm_eval.simple_evaluate(model=self._lm, tasks=list(self.names.values()),
                                                    limit=self.limit, num_fewshot=self.num_fewshot,
                                                    task_manager=self._manager, log_samples=self.log_samples)
        except ConnectionError as exc:
            raise SimdiffError(missing_task_data(", ".join(self.tasks), one_line(str(exc)))) from exc
        self.last_output = out
        results = {}
        for task, name in self.names.items():
            raw = out["results"].get(name, {})
            entry = {m: float(raw[f"{m},none"]) for m in METRICS if f"{m},none" in raw}
            entry.update({f"{m}_stderr": float(raw[f"{m}_stderr,none"]) for m in METRICS
                          if isinstance(raw.get(f"{m}_stderr,none"), (int, float))})
            entry["samples"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
            entry["lm_eval_task"] = name
            results[task] = entry
        return results


def evaluate_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], limit: int | float | None = None,
                   batch_size: int = 8, data_dir: str | None = None, max_length: int | None = None,
                   num_fewshot: int | None = None) -> dict[str, dict]:
    """Accuracy (acc, acc_norm) of ``model`` on each lm-eval task (``limit`` questions per task)."""
    return TaskRunner(model, tokenizer, tasks, limit, batch_size, data_dir, max_length, num_fewshot)()
