"""Each stage's settings as plain dataclasses (no torch at import): criterion options, held-out search,
evaluation. Their fields are the command-line flags (:mod:`simdiff.cli.options` generates them) and the
recipe's sections (:mod:`simdiff.config.recipe`); the code that acts on them lives in its stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simdiff.config.flags import (
    DATA_DIR_HELP,
    DATA_DIR_SHOWN,
    field_flags,
    is_auto,
    names,
    number_or_auto,
    option,
)
from simdiff.core.errors import SimdiffError

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")  # simdiff.model.load.DTYPES maps them to torch dtypes
NORMALIZER_NAMES = ("minmax", "zscore", "rank")  # simdiff.criteria.normalize.NORMALIZERS implements them


DIFF_SCALES = ("absolute", "relative")


SEED_HELP = "seed of every random choice: calibration windows, the random criterion, training order and dropout"


@dataclass
class Options:
    """Criterion options (the SimDiff knobs and the seed of ``random``)."""

    alpha: float | str = option(0.75, "SimDiff weight of the similarity term (1 - alpha goes to the difference "
                                      "terms); 'auto' evaluates every distinct selection along alpha in [0, 1] on "
                                      "held-out calibration windows (--objective) and keeps the set plain prune "
                                      "saves (alpha 0.75) unless a candidate beats it by --margin standard errors; "
                                      "with --criterion best-of, its set is the --margin reference",
                                parse=number_or_auto)
    beta: float = option(1.0, "SimDiff weight of MSSD within the difference term (1 - beta goes to MASD)")
    normalize: str = option("rank", "how each SimDiff metric is normalised across layers", choices=NORMALIZER_NAMES)
    diff_scale: str = option("relative", "MSSD/MASD of y - x in the model's scale, or relative to each token's "
                                         "input RMS", choices=DIFF_SCALES)
    seed: int = option(0, SEED_HELP)

    def __post_init__(self) -> None:
        """Refuse out-of-range values when the options are made, before any calibration pass."""
        self.check()

    def check(self) -> Options:
        """Raise :class:`SimdiffError` naming the first out-of-range field; returns ``self``."""
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if name == "alpha" and is_auto(value):
                continue  # tuned later by simdiff.selection.search
            if isinstance(value, str) or not 0.0 <= value <= 1.0:
                raise SimdiffError(f"--{name} must lie in [0, 1]{' or be auto' if name == 'alpha' else ''}, "
                                   f"got {value}")
        if self.seed < 0:
            raise SimdiffError(f"--seed must be >= 0, got {self.seed}")
        return self


OBJECTIVES = ("kl", "ppl")
HEAL_METHODS = ("none", "linear")  # --heal (simdiff.surgery.heal)
DEFAULT_RIDGE = 1e-4  # --heal-ridge, relative to the mean eigenvalue of M^T W M
HEAL_WEIGHTINGS = ("relative", "uniform")  # --heal-weighting: each token's error / ||L_t||^2, or plain least squares
DEFAULT_HEAL_WEIGHTING = "relative"  # the attention sink would otherwise carry the fit (docs/recovery.md)
DEFAULT_HEAL_SAMPLES = 256  # --heal-samples: 65,536 tokens at the default --calib-seq-len (docs/recovery.md)


DEFAULT_POOL = ("simdiff", "block_influence", "angular_block", "mssd", "masd")


@dataclass
class SearchSettings:
    """How held-out selection works: the objective, the cap on distinct candidates, and best-of's pool."""

    objective: str = option("kl", "held-out objective: kl, mean KL(dense || pruned) of next-token distributions; "
                                  "ppl, perplexity", choices=OBJECTIVES)
    max_candidates: int = option(16, "most distinct alpha-path sets evaluated")
    margin: float = option(3.0, "standard errors (paired, over held-out blocks) by which a candidate must beat the "
                                "set plain prune saves (at the default or given --alpha) to replace it, on the "
                                "objective and on held-out NLL; 0: the lowest held-out score wins")
    pool: list[str] = option(help="criteria best-of pools; simdiff stands for its whole alpha path, and its set at "
                                  "--alpha is the --margin reference (without simdiff: the first criterion's set); "
                                  "ppl_skip and taylor add their passes", parse=names,
                             default_factory=lambda: list(DEFAULT_POOL))

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SimdiffError(f"unknown --objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.max_candidates < 2:
            raise SimdiffError(f"--max-candidates must be >= 2, got {self.max_candidates}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise SimdiffError(f"--margin must be a number >= 0 (standard errors), got {self.margin}")
        if not self.pool:
            raise SimdiffError("--pool must name at least one criterion")
        from simdiff.criteria.registry import get_criterion  # validation against the registry, lazily

        for name in self.pool:
            get_criterion(name)


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


@dataclass
class BenchSettings:
    """Shapes and repeat counts of a benchmark."""

    batch_size: int = option(4, "prefill batch size", flag="--prefill-batch-size")
    seq_len: int = option(256, "prefill tokens per sequence", flag="--prefill-seq-len")
    prompt_len: int = option(32, "decode prompt length")
    new_tokens: int = option(32, "timed decode steps")
    decode_batch: int = option(16, "batch N of the second decode figure (batch 1 is always measured)")
    warmup: int = option(1, "untimed runs before timing")
    repeats: int = option(5, "timed runs (the median is reported)")
    compile: bool = option(False, "decode with a static KV cache and torch.compile (CUDA graphs on GPUs)")
    compile_backend: str = option("inductor", "torch.compile backend (with --compile)")

    def check(self) -> None:
        for flag in field_flags(BenchSettings):
            if flag.field in ("batch_size", "seq_len", "prompt_len", "new_tokens", "decode_batch", "repeats") \
                    and getattr(self, flag.field) < 1:
                raise SimdiffError(f"{flag.flag} must be >= 1, got {getattr(self, flag.field)}")
        if self.warmup < 0:
            raise SimdiffError(f"--warmup must be >= 0, got {self.warmup}")


@dataclass
class Evaluation:
    """WikiText-2 test perplexity settings for the before/after comparison."""

    max_tokens: int = option(16384, "score only the first N tokens of each evaluation text")
    seq_len: int | None = option(None, "tokens per perplexity window, BOS included", flag="--eval-seq-len",
                                 shown="the training window")
    batch_size: int = option(4, "perplexity windows per forward pass", flag="--eval-batch-size")
    data_dir: str | None = option(None, DATA_DIR_HELP, shown=DATA_DIR_SHOWN)
