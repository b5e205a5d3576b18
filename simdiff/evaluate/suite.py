"""One evaluation of the model as it is now (dense, pruned, or with layers bypassed): perplexities + tasks.

The evaluation windows and the lm-eval model wrapper are prepared once, so a comparison can evaluate many
candidates on one loaded model; ``percent_retained`` compares a candidate with the dense model.
"""

from __future__ import annotations

import math
import time

from torch import nn

from simdiff.config.settings import EvalSettings
from simdiff.evaluate.perplexity import PerplexityProtocol, evaluation_batches, perplexity_report


def protocol(settings: EvalSettings, source: str) -> PerplexityProtocol:
    """How ``settings`` measure perplexity on ``source`` (its test split)."""
    return PerplexityProtocol(source, "test", settings.seq_len, settings.max_tokens, settings.batch_size,
                              settings.data_dir)


class Evaluator:
    """Call it to evaluate ``model`` in its current state; windows and task wrappers are built once."""

    def __init__(self, model: nn.Module, tokenizer, settings: EvalSettings) -> None:
        self.model, self.settings = model, settings
        self._ppl = {source: evaluation_batches(tokenizer, protocol(settings, source)) for source in settings.ppl}
        self._tasks = None
        if settings.tasks:
            from simdiff.evaluate.harness import TaskRunner

            self._tasks = TaskRunner(model, tokenizer, settings.tasks, settings.limit, settings.task_batch_size,
                                     settings.data_dir, settings.max_length, settings.num_fewshot,
                                     settings.log_samples)

    @property
    def lm_eval_output(self) -> dict:
        """lm-eval's raw ``simple_evaluate`` result of the last call (empty without tasks)."""
        return self._tasks.last_output if self._tasks is not None else {}

    def __call__(self, desc: str = "") -> dict:
        """``{"perplexity": {source: report}, "tasks": {task: scores}, "eval_seconds": s}``."""
        start = time.perf_counter()
        ppl = {}
        for source, (eval_batches, bos) in self._ppl.items():
            ppl[source] = perplexity_report(self.model, eval_batches, protocol(self.settings, source), bos,
                                            desc=f"perplexity {source} {desc}".strip())
        tasks = self._tasks() if self._tasks is not None else {}
        return {"perplexity": ppl, "tasks": tasks, "eval_seconds": time.perf_counter() - start}


def _ratio(num: float, den: float, scale: float = 1.0) -> float:
    return scale * num / den if den and math.isfinite(num) and math.isfinite(den) else float("nan")


def percent_retained(dense: dict, pruned: dict, metrics: tuple[str, ...] = ("acc", "acc_norm")) -> dict:
    """% of the dense accuracy kept, per task and on average (mean pruned acc / mean dense acc, as papers
    report it), per metric; and the perplexity ratio (pruned / dense) per source."""
    out: dict = {"tasks": {}, "average": {}, "ppl_ratio": {}}
    tasks = [t for t in dense.get("tasks", {}) if t in pruned.get("tasks", {})]
    for metric in metrics:
        have = [t for t in tasks if metric in dense["tasks"][t] and metric in pruned["tasks"][t]]
        for task in have:
            out["tasks"].setdefault(task, {})[metric] = _ratio(pruned["tasks"][task][metric],
                                                               dense["tasks"][task][metric], 100.0)
        if have:
            mean_p = sum(pruned["tasks"][t][metric] for t in have) / len(have)
            mean_d = sum(dense["tasks"][t][metric] for t in have) / len(have)
            out["average"][metric] = _ratio(mean_p, mean_d, 100.0)
    for source, report in pruned.get("perplexity", {}).items():
        if source in dense.get("perplexity", {}):
            out["ppl_ratio"][source] = _ratio(report["perplexity"], dense["perplexity"][source]["perplexity"])
    return out


def mean_accuracy(result: dict, metric: str = "acc") -> float:
    """Mean of ``metric`` over the evaluated tasks (NaN without tasks)."""
    values = [scores[metric] for scores in result.get("tasks", {}).values() if metric in scores]
    return sum(values) / len(values) if values else float("nan")
