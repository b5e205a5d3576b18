"""Criterion specs, parsed in one place: ``name``, ``name:key=value[:key=value]`` (``simdiff:alpha=auto``),
``best-of``, comma lists and ``all``. No torch: the recipe validates with it before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from simdiff.config.flags import AUTO, is_auto, names
from simdiff.config.settings import Options
from simdiff.core.errors import SimdiffError
from simdiff.criteria.registry import get_criterion

BEST_OF = "best-of"  # the best of --pool on held-out windows (simdiff.selection.search)


OPTION_TYPES = {"alpha": float, "beta": float, "normalize": str, "diff_scale": str, "seed": int}


@dataclass(frozen=True)
class CandidateSpec:
    """A criterion with optional option overrides, written ``name`` or ``name:key=value[:key=value]``."""

    label: str
    criterion: str
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, text: str) -> CandidateSpec:
        name, *parts = [p.strip() for p in text.strip().split(":")]
        reads = set(OPTION_TYPES) if name == BEST_OF else get_criterion(name).reads
        overrides = []
        for part in parts:
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in OPTION_TYPES:
                raise SimdiffError(f"bad criterion option {part!r} in {text!r}; write name:key=value with key one "
                                   f"of {', '.join(OPTION_TYPES)} (e.g. simdiff:alpha=auto)")
            if key not in reads:
                uses = f"it reads only {', '.join(sorted(reads))}" if reads else "it reads no option"
                raise SimdiffError(f"{name} does not use {key} ({uses}), so {text!r} would change nothing; drop "
                                   f":{key}=... or use a criterion that reads it (simdiff reads alpha, beta, "
                                   "normalize, diff_scale)")
            if key == "alpha" and is_auto(value):
                overrides.append((key, AUTO))
                continue
            try:
                overrides.append((key, OPTION_TYPES[key](value)))
            except ValueError:
                raise SimdiffError(f"bad value {value!r} for {key} in {text!r}") from None
        return cls(text.strip(), name, tuple(overrides))

    def options(self, base: Options) -> Options:
        return replace(base, **dict(self.overrides))


def criterion_names(value: str) -> list[str]:
    """The specs of a comma list, ``all`` expanded to every registered criterion (unchecked)."""
    from simdiff.criteria import CRITERIA  # every criterion registered

    return list(CRITERIA) if value.strip() == "all" else names(value)


def parse_candidates(value: str) -> list[CandidateSpec]:
    """Comma-separated candidate specs (``all`` = every registered criterion); duplicates are an error."""
    texts = criterion_names(value)
    specs = [CandidateSpec.parse(t) for t in texts]
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise SimdiffError(f"--criterion must list distinct criteria, got {value!r}")
    return specs
