"""One evaluation of the model as it is now (dense, pruned, or with layers bypassed): perplexities + tasks.

The evaluation windows and the lm-eval model wrapper are prepared once, so a comparison can evaluate many
candidates on one loaded model; ``percent_retained`` compares a candidate with the dense model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from torch import nn

from simdiff.config.flags import DATA_DIR_HELP, DATA_DIR_SHOWN, names, option
from simdiff.core.errors import SimdiffError
from simdiff.evaluate.perplexity import PerplexityProtocol, evaluation_batches, perplexity_report


@dataclass
class EvalSettings:
    """What to measure: perplexity on each ``ppl`` source (test split) and accuracy on each lm-eval task."""

    ppl: list[str] = option(help="perplexity sources, comma-separated: wikitext2 (test split) and/or .txt/.jsonl "
                                 "files ('' for none)", parse=names, default_factory=lambda: ["wikitext2"])
    seq_len: int = option(2048, "tokens per perplexity window, BOS included", flag="--eval-seq-len")
    max_tokens: int | None = option(None, "score only the first N tokens of each evaluation text",
                                    shown="the whole text")
    batch_size: int = option(1, "perplexity windows per forward pass", flag="--eval-batch-size")
    tasks: list[str] = option(help="lm-eval tasks, comma-separated, e.g. piqa,hellaswag (piqa runs offline from "
                                   "--data-dir)", parse=names, default_factory=list)
    limit: int | None = option(None, "questions per task", shown="all")
    task_batch_size: int = option(8, "lm-eval batch size")
    max_length: int | None = option(None, "lm-eval context length", flag="--task-max-length",
                                    shown="the model's max_position_embeddings")
    metric: str = option("acc", "accuracy used for % retained", choices=("acc", "acc_norm"))
    data_dir: str | None = option(None, DATA_DIR_HELP, shown=DATA_DIR_SHOWN)
    num_fewshot: int | None = option(None, "examples in each lm-eval prompt, as lm-eval's --num_fewshot",
                                     shown="each task's own, 0 for most")
    log_samples: bool = option(False, "also write lm-eval's per-question records, samples_<task>_<date>.jsonl, "
                                      "beside --json")

    def check(self) -> EvalSettings:
        """Positive sizes and something to measure, else :class:`SimdiffError` naming the flag."""
        for name, flag, least in (("seq_len", "--eval-seq-len", 2), ("batch_size", "--eval-batch-size", 1),
                                  ("max_tokens", "--max-tokens", 1), ("limit", "--limit", 1),
                                  ("task_batch_size", "--task-batch-size", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise SimdiffError(f"{flag} must be >= {least}, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise SimdiffError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if not self.ppl and not self.tasks:
            raise SimdiffError("nothing to evaluate: give --ppl wikitext2 and/or --tasks piqa")
        return self

    def protocol(self, source: str) -> PerplexityProtocol:
        return PerplexityProtocol(source, "test", self.seq_len, self.max_tokens, self.batch_size, self.data_dir)


class Evaluator:
    """Call it to evaluate ``model`` in its current state; windows and task wrappers are built once."""

    def __init__(self, model: nn.Module, tokenizer, settings: EvalSettings) -> None:
        self.model, self.settings = model, settings
        self._ppl = {source: evaluation_batches(tokenizer, settings.protocol(source)) for source in settings.ppl}
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
            ppl[source] = perplexity_report(self.model, eval_batches, self.settings.protocol(source), bos,
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
