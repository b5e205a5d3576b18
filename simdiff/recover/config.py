"""Settings of a LoRA recovery run (one dataclass shared by the CLI, the API and the checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from simdiff.errors import SimdiffError

ALL_LINEAR = "all-linear"

# Settings that may change when a run is resumed (everything else must match the checkpoint).
RESUMABLE = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "data_dir"}


@dataclass
class RecoverConfig:
    """LoRA fine-tuning settings. ``data`` is the *training* text: WikiText-2 validation split by default."""

    data: str = "wikitext2"
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = ALL_LINEAR
    seed: int = 0
    heldout_windows: int = 8
    eval_every: int = 25
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    data_dir: str | None = None

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "rank": self.rank}
        for name, value in positive.items():
            if value < 1:
                raise SimdiffError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.seq_len < 2:
            raise SimdiffError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise SimdiffError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise SimdiffError(f"--dropout must be in [0, 1), got {self.dropout}")
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
