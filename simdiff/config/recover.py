"""Settings of a LoRA recovery run (one dataclass shared by the CLI, the API and the checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from simdiff.config.flags import DATA_DIR_HELP, DATA_DIR_SHOWN, option
from simdiff.config.settings import SEED_HELP
from simdiff.core.errors import SimdiffError

ALL_LINEAR = "all-linear"

# Settings that may change when a run is resumed (everything else must match the checkpoint).
RESUMABLE = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "data_dir"}


@dataclass
class RecoverConfig:
    """LoRA fine-tuning settings. ``data`` is the *training* text: WikiText-2 validation split by default."""

    data: str = option("wikitext2", "training text: wikitext2 (its validation split; test is kept for evaluation) "
                                    "or a .txt/.jsonl file or folder")
    steps: int = option(200, "optimiser steps")
    batch_size: int = option(4, "training windows per micro-batch per process", flag="--train-batch-size")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    seq_len: int = option(256, "tokens per training window (BOS included)", flag="--train-seq-len")
    lr: float = option(2e-4, "peak learning rate (AdamW)")
    warmup_steps: int | None = option(None, "linear warm-up steps before the cosine decay", shown="10% of --steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    rank: int = option(8, "LoRA rank", flag="--lora-rank")
    alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / rank)", flag="--lora-alpha")
    dropout: float = option(0.05, "LoRA dropout", flag="--lora-dropout")
    target_modules: str = option(ALL_LINEAR, "LoRA target modules, comma-separated (e.g. q_proj,v_proj); "
                                             "all-linear: every linear layer except the LM head")
    seed: int = option(0, SEED_HELP)
    heldout_windows: int = option(8, "windows at the end of the training text held out for the held-out loss")
    eval_every: int = option(25, "held-out loss before training and every N steps (0: never)")
    checkpoint_every: int = option(50, "checkpoint every N steps (0: never)")
    keep_checkpoints: int = option(2, "keep only the newest N checkpoints (0: all)")
    data_dir: str | None = option(None, DATA_DIR_HELP, shown=DATA_DIR_SHOWN)

    def __post_init__(self) -> None:
        positive = {"--steps": self.steps, "--train-batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--lora-rank": self.rank}
        for flag, value in positive.items():
            if value < 1:
                raise SimdiffError(f"{flag} must be >= 1, got {value}")
        if self.seq_len < 2:
            raise SimdiffError(f"--train-seq-len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise SimdiffError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise SimdiffError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise SimdiffError(f"--warmup-steps must be in [0, --steps={self.steps}], got {self.warmup_steps}")
        for name in ("seed", "heldout_windows", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise SimdiffError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    @property
    def warmup(self) -> int:
        """Warm-up steps: the explicit value, else 10% of ``steps``."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    def modules(self) -> str | list[str]:
        """peft ``target_modules``: ``'all-linear'`` (every linear layer but the LM head) or a list of names."""
        if self.target_modules == ALL_LINEAR:
            return ALL_LINEAR
        names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        if not names:
            raise SimdiffError("--target-modules is empty; use 'all-linear' or names like q_proj,v_proj")
        return names

    def to_dict(self) -> dict:
        return asdict(self)

    def check_resumable(self, saved: dict) -> None:
        """Raise if a checkpoint was written with settings that change the run (other than its length)."""
        names = {f.name for f in fields(self)} - RESUMABLE
        diff = {n: (saved.get(n), getattr(self, n)) for n in sorted(names) if saved.get(n) != getattr(self, n)}
        if diff:
            shown = ", ".join(f"{n}: checkpoint {a!r} vs now {b!r}" for n, (a, b) in diff.items())
            raise SimdiffError(f"cannot resume: settings differ from the checkpoint ({shown}); "
                               "use the same options or a fresh --checkpoint-dir")
