"""Heal without training: replace each removed run of layers by a least-squares linear map folded into the
MLP output projection of the kept layer before it (ReplaceMe, arXiv 2505.02819).

Derivation. Take a maximal run a..b of removed layers and its kept predecessor p = a-1 (a run starting at
layer 0 has no predecessor and is refused). In layer p the MLP branch output M (a row per token, d wide) is
added to the residual: p's output is Y + M, where Y is p's residual before that add (its input plus its
attention output, or for parallel-residual layers its input plus the attention branch). The dense model then
runs layers a..b and reaches L. After pruning, layer b+1 reads p's output instead, so we want

    Y + M' ~= L   with   M' = M T   (T: d x d),

i.e. T minimises sum_t w_t ||m_t T - (l_t - y_t)||^2 over all non-padding calibration tokens t. The weight
(``weighting``) is ``relative``, w_t = 1 / ||l_t||^2 (each token's error relative to the residual it lands in,
which the next layers read through a norm; without it the attention-sink token, whose residual is ~150x the
others' on SmolLM2, carries 99.9% of the fit), or ``uniform``, w_t = 1 (plain least squares). With
G = M^T W M and C = M^T W (L - Y), accumulated in float64, and a ridge that shrinks T towards the identity (the
plain prune, T = I, is the fallback rather than T = 0, which would delete p's MLP):

    T = (G + lam I)^-1 (C + lam I),   lam = ridge * trace(G) / d.

``trace(G) / d`` is G's mean eigenvalue, so ``ridge`` is relative: scaling M by c scales lam by c^2 and leaves
T unchanged, and ridge = 0 is ordinary least squares. Folding: every projection that writes M is linear,
M = sum_k g_k (h_k W_k^T + b_k) with per-token scalar gates g_k (1 for a plain MLP, the router weights and
the shared-expert gate of a MoE), hence M T = sum_k g_k (h_k (T^T W_k)^T + b_k T): each output projection
gets W' = T^T W (``nn.Linear``, ``[d, in]``; every expert of a ``[E, d, in]`` expert stack), W' = W T for
GPT-2's transposed ``Conv1D`` (``[in, d]``), and its bias b' = b T. The checkpoint keeps its architecture and
parameter count.

Every ``CHECK_EVERY``-th calibration window (the last one where there are fewer) is held out of the fit as a
check: the map fitted on the other windows must predict L - Y on the check windows better than the plain
prune (T = I, weighted R^2), else the run is left unhealed (no weight changes) and the log says why: a map
fitted on too few tokens for its d x d entries does worse than no map. A map that passes is refitted on all
windows, so the check costs no tokens.

Runs are healed first to last, each fitted on the model with the earlier runs already folded and bypassed
(one partial calibration pass per run, stopped at layer b); ``targets="dense"`` fits every run against the
dense model's activations in one pass instead. The MLP branch is found structurally, not by module name: on
one calibration window, the last-executed child of layer p (with parameters) whose output, when doubled,
moves p's output by exactly that output is the residual branch. Where that branch has no projection to fold
into (Gemma-2/3: the MLP output passes through a post-feed-forward norm first) healing is refused. After
folding, the branch is re-run on the captured window and must give M T: the fold is verified, never assumed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from simdiff.collect.hooks import layer_output, run_decoder
from simdiff.config.settings import DEFAULT_HEAL_WEIGHTING, DEFAULT_RIDGE, HEAL_METHODS, HEAL_WEIGHTINGS
from simdiff.core.errors import SimdiffError
from simdiff.core.progress import progress
from simdiff.data.windows import Batch
from simdiff.model.layers import bypass_layers, find_decoder_layers

log = logging.getLogger(__name__)

TARGETS = ("sequential", "dense")
CHECK_EVERY = 8  # every 8th heal window checks the fit instead of entering it (the map is then refitted on all)


class _Stop(Exception):
    """Raised from a hook once the activations a pass needs are captured (the rest of the model is skipped)."""


def removed_runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``(a, b)`` of consecutive removed layers, in order."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(removed)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def check_healable(removed: Sequence[int], method: str = "linear") -> None:
    """Refuse (before any work) what cannot be healed by folding: a removed run that starts at layer 0."""
    if method not in HEAL_METHODS:
        raise SimdiffError(f"--heal must be one of {', '.join(HEAL_METHODS)}, got {method!r}")
    if method != "none" and 0 in set(removed):
        run = removed_runs(removed)[0]
        raise SimdiffError(f"--heal linear cannot heal the removed run {list(range(run[0], run[1] + 1))}: it starts "
                           "at layer 0, so no kept layer precedes it to fold the map into (the embedding may be "
                           "tied); keep layer 0 (--keep-first 1) or use --heal none")


# -- finding the MLP branch and its output projections -----------------------------------------------------
@dataclass
class Projection:
    """A tensor that writes (part of) the MLP output: ``kind`` linear ``[d, in]``, conv1d ``[in, d]`` or
    experts ``[E, d, in]``; ``bias`` is its ``[d]`` (``[E, d]`` for experts) bias or None."""

    name: str
    module: nn.Module
    weight: str
    kind: str
    bias: str | None = None


@dataclass
class Branch:
    """Layer ``layer``'s MLP residual branch: the module whose output is added to the residual."""

    layer: int
    name: str
    module: nn.Module
    projections: list[Projection]


def _replace_first(output, tensor: torch.Tensor):
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


def _run_to(model: nn.Module, layer: nn.Module, batch: Batch, hooks: dict[nn.Module, object]) -> None:
    """Forward ``batch`` with the given forward hooks, stopping once ``layer`` has run."""
    def stop(module, args, output):
        raise _Stop

    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    handles.append(layer.register_forward_hook(stop))
    try:
        with suppress(_Stop):
            run_decoder(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def find_projections(module: nn.Module, hidden: int) -> list[Projection]:
    """The linear maps inside ``module`` whose output width is ``hidden`` (the "down" projections: where some
    read another width, square ones are dropped, e.g. a router of ``hidden`` experts)."""
    found: list[tuple[Projection, int]] = []
    conv1d = _conv1d_type()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and sub.out_features == hidden:
            found.append((Projection(name, sub, "weight", "linear", "bias" if sub.bias is not None else None),
                          sub.in_features))
        elif isinstance(sub, conv1d) and sub.weight.shape[1] == hidden:
            found.append((Projection(name, sub, "weight", "conv1d", "bias" if sub.bias is not None else None),
                          sub.weight.shape[0]))
        elif not isinstance(sub, (nn.Linear, conv1d)):
            for pname, param in sub.named_parameters(recurse=False):
                if param.dim() == 3 and param.shape[1] == hidden:  # an expert stack [E, d, in]
                    bias = getattr(sub, f"{pname}_bias", None)
                    has_bias = isinstance(bias, torch.Tensor) and tuple(bias.shape) == tuple(param.shape[:2])
                    found.append((Projection(f"{name}.{pname}".lstrip("."), sub, pname, "experts",
                                             f"{pname}_bias" if has_bias else None), param.shape[2]))
    if any(width != hidden for _, width in found):
        found = [(p, width) for p, width in found if width != hidden]
    return [p for p, _ in found]


def _additive(base: torch.Tensor, moved: torch.Tensor, branch: torch.Tensor) -> bool:
    """``moved == base + branch`` to the dtype's rounding, with a residual left over (``base != branch``)."""
    eps = torch.finfo(base.dtype).eps
    base, moved, branch = base.double(), moved.double(), branch.double()
    scale = base.norm() + moved.norm()
    error = (moved - base - branch).norm()
    return bool(error <= 16 * eps * scale and (base - branch).norm() > 16 * eps * scale)


def find_branch(model: nn.Module, index: int, batch: Batch) -> Branch:
    """Layer ``index``'s MLP residual branch, checked on ``batch`` (see the module docstring); refuses where
    it cannot be folded."""
    layer = find_decoder_layers(model).modules[index]
    children = {child: name for name, child in layer.named_children()
                if any(True for _ in child.parameters())}
    order: list[nn.Module] = []
    outputs: dict[nn.Module, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}

    def record(module, args, output):
        order.append(module)
        outputs[module] = layer_output(output).detach()

    def keep_output(module, args, output):
        captured["out"] = layer_output(output).detach()

    hooks = {child: record for child in children}
    _run_to(model, layer, batch, {**hooks, layer: keep_output})
    base = captured["out"]
    seen: list[nn.Module] = []
    for child in reversed(order):
        out = outputs[child]
        if child in seen or out.shape[-1] != base.shape[-1] or out.numel() != base.numel():
            continue  # not hidden-state shaped (OPT runs its MLP on flattened tokens: same numel)
        seen.append(child)

        def double(module, args, output):
            return _replace_first(output, 2 * layer_output(output))

        _run_to(model, layer, batch, {child: double, layer: keep_output})
        if _additive(base, captured["out"], out.reshape(base.shape)):
            return _branch_of(index, children[child], child, base.shape[-1])
    raise SimdiffError(f"--heal linear: layer {index} ({type(layer).__name__}) has no sub-module whose output is "
                       "added unchanged to the residual stream, so there is no MLP output to fold a map into; "
                       "use --heal none")


def _branch_of(index: int, name: str, module: nn.Module, hidden: int) -> Branch:
    projections = find_projections(module, hidden)
    for projection in projections:
        projection.name = f"{name}.{projection.name}" if projection.name else name
    if not projections:
        raise SimdiffError(f"--heal linear: layer {index}'s MLP output reaches the residual through {name} "
                           f"({type(module).__name__}), which has no linear projection to fold into (e.g. "
                           "Gemma-2/3's post-feed-forward norm); this architecture cannot be healed by folding, "
                           "use --heal none")
    return Branch(index, name, module, projections)


def note_calibration_text(source: str) -> None:
    """Say, before any fit, that healing adapts the kept layers to the calibration text (measured in
    docs/recovery.md: fitted on WikiText alone, SmolLM2's Python-text perplexity got worse)."""
    log.info("--heal linear fits the kept layers to the calibration text (%s); text unlike it can get worse: "
             "calibrate on text like the model's use (--calib FILE or FOLDER, a mix of domains in one folder)",
             source)


def preflight(model: nn.Module, batches: Sequence[Batch]) -> Branch:
    """Before any scoring: refuse an architecture whose MLP output cannot take a folded map (checked on layer
    0 and the first window; every healed layer is checked again when its run is fitted)."""
    if not batches:
        raise SimdiffError("--heal linear needs calibration windows")
    return find_branch(model, 0, Batch(batches[0].input_ids[:1], batches[0].attention_mask[:1]))


# -- accumulating the normal equations ---------------------------------------------------------------
@dataclass
class NormalEquations:
    """``G = M^T W M``, ``C = M^T W D`` (D = L - Y, W the token weights) and what the weighted R^2 needs, in
    float64."""

    hidden: int
    device: torch.device
    gram: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    target_sum: torch.Tensor = field(init=False)
    target_square: float = 0.0
    weight_sum: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        d = self.hidden
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.cross = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.target_sum = torch.zeros(d, dtype=torch.float64, device=self.device)

    def add(self, mlp: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add token rows ``mlp`` (M) and ``target`` (L - Y), both ``[N, d]``, with weights ``[N]`` (default 1)."""
        m, t = mlp.double(), target.double()
        w = torch.ones(m.shape[0], dtype=torch.float64, device=m.device) if weight is None else weight.double()
        wm = m * w[:, None]
        self.gram += wm.T @ m
        self.cross += wm.T @ t
        self.target_sum += (t * w[:, None]).sum(0)
        self.target_square += float((w[:, None] * t * t).sum())
        self.weight_sum += float(w.sum())
        self.tokens += m.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, float]:
        """``(T, lam)``: the ridge solution shrunk towards the identity (see the module docstring)."""
        d = self.hidden
        lam = ridge * float(torch.trace(self.gram)) / d
        eye = torch.eye(d, dtype=torch.float64, device=self.device)
        if lam > 0:
            return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * eye), lam
        return torch.linalg.pinv(self.gram, hermitian=True) @ self.cross, 0.0

    def absorb(self, other: NormalEquations) -> None:
        """Add ``other``'s tokens to these equations (in place)."""
        self.gram += other.gram
        self.cross += other.cross
        self.target_sum += other.target_sum
        self.target_square += other.target_square
        self.weight_sum += other.weight_sum
        self.tokens += other.tokens

    def r2(self, transform: torch.Tensor) -> float:
        """R^2 of ``M T`` as a prediction of ``L - Y`` over the accumulated tokens (weighted as the fit)."""
        sse = self.target_square - 2 * float((transform * self.cross).sum()) \
            + float((transform * (self.gram @ transform)).sum())
        sst = self.target_square - float(self.target_sum @ self.target_sum) / self.weight_sum \
            if self.weight_sum > 0 else 0.0
        return 1.0 - sse / sst if sst > 0 else float("nan")


# -- folding -----------------------------------------------------------------------------------------
def _fold_one(projection: Projection, transform: torch.Tensor) -> None:
    weight = getattr(projection.module, projection.weight)
    w = weight.detach().double()
    t = transform.to(w.device)
    if projection.kind == "linear":
        new = t.T @ w
    elif projection.kind == "conv1d":
        new = w @ t
    else:
        new = torch.einsum("do,edi->eoi", t, w)
    weight.data.copy_(new.to(weight.dtype))
    if projection.bias is not None:
        bias = getattr(projection.module, projection.bias)
        bias.data.copy_((bias.detach().double() @ t).to(bias.dtype))


def _snapshot(branch: Branch) -> dict[tuple[int, str], torch.Tensor]:
    saved = {}
    for k, proj in enumerate(branch.projections):
        for name in (proj.weight, proj.bias):
            if name is not None:
                saved[(k, name)] = getattr(proj.module, name).detach().clone()
    return saved


def _restore(branch: Branch, saved: dict[tuple[int, str], torch.Tensor]) -> None:
    for (k, name), tensor in saved.items():
        getattr(branch.projections[k].module, name).data.copy_(tensor)


def fold(branch: Branch, transform: torch.Tensor, probe: tuple[tuple, dict, torch.Tensor]) -> None:
    """Fold ``transform`` into every output projection of ``branch``; verified by re-running the branch on
    the ``probe`` (its captured args, kwargs and output): it must now give ``output @ T``."""
    saved = _snapshot(branch)
    for projection in branch.projections:
        _fold_one(projection, transform)
    args, kwargs, before = probe
    with torch.no_grad():
        after = layer_output(branch.module(*args, **kwargs)).double()
    expected = before.double() @ transform.to(before.device)
    dtype = getattr(branch.projections[0].module, branch.projections[0].weight).dtype
    tolerance = max(1e-4, 32 * torch.finfo(dtype).eps)
    error = float((after - expected).norm() / expected.norm().clamp_min(1e-30))
    if not error <= tolerance:
        _restore(branch, saved)
        raise SimdiffError(f"--heal linear: folding into layer {branch.layer}'s {branch.name} "
                           f"({', '.join(p.name for p in branch.projections)}) does not reproduce M*T "
                           f"(relative error {error:.2g}); this architecture cannot be healed by folding, "
                           "use --heal none")


# -- fitting --------------------------------------------------------------------------------------------
@dataclass
class HealedRun:
    """One healed run: the layers replaced, the layer folded into, and the fit's quality."""

    layers: list[int]
    folded_into: int
    branch: str
    projections: list[str]
    tokens: int
    ridge_lambda: float
    r2_calibration: float
    r2_calibration_unhealed: float
    folded: bool = True
    check_tokens: int = 0
    r2_check: float | None = None
    r2_check_unhealed: float | None = None
    transform: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("transform")
        return out


@dataclass
class HealRecord:
    """What healing did (``simdiff.json``'s ``heal`` entry)."""

    method: str
    ridge: float
    targets: str
    runs: list[HealedRun]
    passes: int
    seconds: float
    weighting: str = DEFAULT_HEAL_WEIGHTING
    checked: bool = True
    statistics_dtype: str = "float64"
    weights_dtype: str = ""
    fitted_on: str = "calibration windows"

    def to_dict(self) -> dict:
        return {"method": self.method, "ridge": self.ridge, "ridge_lambda": "ridge * trace(M^T W M) / d",
                "weighting": self.weighting, "weighting_note": WEIGHTING_NOTES[self.weighting],
                "fitted_on": self.fitted_on,
                "targets": self.targets, "runs": [r.to_dict() for r in self.runs], "passes": self.passes,
                "passes_note": "one calibration pass per removed run, each stopped after the run's last layer"
                               if self.targets == "sequential" else "one calibration pass for all runs",
                "seconds": round(self.seconds, 3), "statistics_dtype": self.statistics_dtype,
                "weights_dtype": self.weights_dtype,
                "check": f"every {CHECK_EVERY}th window held out of the fit: a map that predicts its tokens worse "
                         "than the plain prune (r2_check <= r2_check_unhealed) is not folded (folded: false)"
                         if self.checked else "none: every fitted map folded",
                "changed_layers": [r.folded_into for r in self.runs if r.folded]}


WEIGHTING_NOTES = {"relative": "each token's squared error divided by ||L_t||^2 (its target residual's); R^2 "
                               "weighted the same way",
                   "uniform": "plain least squares, every token weighs 1"}


def check_weighting(weighting: str) -> None:
    if weighting not in HEAL_WEIGHTINGS:
        raise SimdiffError(f"--heal-weighting must be one of {', '.join(HEAL_WEIGHTINGS)}, got {weighting!r}")


def token_weights(residual: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-token weights of the fit from the target residual ``L`` (``[N, d]``): None for uniform."""
    if weighting == "uniform":
        return None
    square = residual.double().pow(2).sum(-1)
    return 1.0 / square.clamp_min(torch.finfo(torch.float64).tiny)


@dataclass
class SplitEquations:
    """One run's normal equations on the fit windows and on the check windows."""

    fit: NormalEquations
    check: NormalEquations

    @classmethod
    def empty(cls, hidden: int, device: torch.device) -> SplitEquations:
        return cls(NormalEquations(hidden, device), NormalEquations(hidden, device))


def check_windows(count: int) -> list[bool]:
    """Which of ``count`` windows check the fit: every ``CHECK_EVERY``-th, or the last of fewer (none of 1)."""
    chosen = [(i + 1) % CHECK_EVERY == 0 for i in range(count)]
    if count > 1 and not any(chosen):
        chosen[-1] = True
    return chosen


class _RunCapture:
    """Hooks capturing, per batch, p's branch output M, p's output and layer b's output for one run."""

    def __init__(self, branch: Branch, layer_p: nn.Module, layer_b: nn.Module, stop: bool) -> None:
        self.branch, self.layer_p, self.layer_b, self.stop = branch, layer_p, layer_b, stop
        self.values: dict[str, torch.Tensor] = {}
        self.probe: tuple | None = None

    def hooks(self) -> list:
        def on_branch(module, args, kwargs, output):
            self.values["m"] = layer_output(output).detach()
            if self.probe is None:
                self.probe = (args, kwargs, self.values["m"])

        def on_p(module, args, kwargs, output):
            self.values["p"] = layer_output(output).detach()

        def on_b(module, args, kwargs, output):
            self.values["b"] = layer_output(output).detach()
            if self.stop:
                raise _Stop

        return [self.branch.module.register_forward_hook(on_branch, with_kwargs=True),
                self.layer_p.register_forward_hook(on_p, with_kwargs=True),
                self.layer_b.register_forward_hook(on_b, with_kwargs=True)]

    def add_rows(self, equations: SplitEquations, mask: torch.Tensor, checks: torch.Tensor, weighting: str) -> None:
        """Add the batch's non-padding tokens (float64) to the fit equations, those of its check windows
        (``checks``: ``[B]`` bool) to the check equations."""
        keep = mask.reshape(-1).bool()
        flat = {k: v.reshape(-1, v.shape[-1])[keep.to(v.device)].double() for k, v in self.values.items()}
        m, residual = flat["m"], flat["b"]
        target, weights = residual - (flat["p"] - m), token_weights(residual, weighting)
        in_check = checks.to(mask.device)[:, None].expand_as(mask).reshape(-1)[keep].to(m.device)
        for equation, rows in ((equations.fit, ~in_check), (equations.check, in_check)):
            if bool(rows.any()):
                equation.add(m[rows], target[rows], None if weights is None else weights[rows])


def _stream(model: nn.Module, batches: Sequence[Batch], captures: list[_RunCapture],
            equations: list[SplitEquations], desc: str, weighting: str) -> None:
    checks = torch.tensor(check_windows(sum(int(b.input_ids.shape[0]) for b in batches)))
    handles = [h for c in captures for h in c.hooks()]
    start = 0
    try:
        for batch in progress(batches, desc=desc):
            for c in captures:
                c.values.clear()
            with suppress(_Stop):
                run_decoder(model, batch)
            size = int(batch.input_ids.shape[0])
            for c, eq in zip(captures, equations):
                c.add_rows(eq, batch.attention_mask, checks[start:start + size], weighting)
            start += size
    finally:
        for handle in handles:
            handle.remove()


def log_memory(runs: list[tuple[int, int]], hidden: int, targets: str) -> None:
    per_run = 4 * hidden * hidden * 8
    held = per_run * (len(runs) if targets == "dense" else 1)
    log.info("heal linear: %d run(s) %s, d=%d: four float64 d x d matrices per run, fit and check windows (%.1f "
             "MB each run, %.1f MB held at once)", len(runs), [list(range(a, b + 1)) for a, b in runs], hidden,
             per_run / 1e6, held / 1e6)


@torch.no_grad()
def heal_layers(model: nn.Module, batches: Sequence[Batch], removed: Sequence[int], ridge: float = DEFAULT_RIDGE,
                targets: str = "sequential", weighting: str = DEFAULT_HEAL_WEIGHTING, check: bool = True,
                ) -> HealRecord:
    """Fold a least-squares map for every removed run into its predecessor's MLP output projection, in place.

    The removed layers stay in ``model`` (remove or bypass them afterwards); only the folded projections'
    weights change. ``targets``: ``sequential`` (each run fitted with the earlier runs healed and bypassed,
    one partial pass per run) or ``dense`` (all runs fitted against the dense model in one pass).
    ``weighting``: ``relative`` or ``uniform`` token weights (see the module docstring). ``check=False`` folds
    every fitted map, checked or not (the windows all enter the fit, as the check-passing maps' refit does).
    """
    if targets not in TARGETS:
        raise SimdiffError(f"heal targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    check_weighting(weighting)
    if ridge < 0:
        raise SimdiffError(f"--heal-ridge must be >= 0, got {ridge}")
    check_healable(removed)
    if not batches:
        raise SimdiffError("--heal linear needs calibration windows")
    start = time.perf_counter()
    decoder = find_decoder_layers(model)
    runs = removed_runs(removed)
    branches = [find_branch(model, a - 1, batches[0]) for a, _ in runs]
    hidden = _first_hidden(branches[0])
    log_memory(runs, hidden, targets)
    device = next(model.parameters()).device
    results: list[HealedRun] = []
    if targets == "dense":
        captures = [_RunCapture(br, decoder.modules[a - 1], decoder.modules[b], stop=False)
                    for (a, b), br in zip(runs, branches)]
        equations = [SplitEquations.empty(hidden, device) for _ in runs]
        _stream(model, batches, captures, equations, "heal: dense targets", weighting)
        for (a, b), br, cap, eq in zip(runs, branches, captures, equations):
            results.append(_solve_and_fold(a, b, br, cap, eq, ridge, check))
        passes = 1
    else:
        for k, ((a, b), br) in enumerate(zip(runs, branches)):
            earlier = [i for a2, b2 in runs[:k] for i in range(a2, b2 + 1)]
            capture = _RunCapture(br, decoder.modules[a - 1], decoder.modules[b], stop=True)
            equation = SplitEquations.empty(hidden, device)
            with bypass_layers(model, earlier):
                _stream(model, batches, [capture], [equation], f"heal: run {a}-{b}", weighting)
            results.append(_solve_and_fold(a, b, br, capture, equation, ridge, check))
        passes = len(runs)
    dtype = str(getattr(branches[0].projections[0].module, branches[0].projections[0].weight).dtype)
    record = HealRecord("linear", ridge, targets, results, passes, time.perf_counter() - start, weighting, check,
                        weights_dtype=dtype.replace("torch.", ""))
    log.info("heal linear: %d of %d run(s) folded into layers %s in %.1fs (%d pass(es)); R^2 %s",
             sum(r.folded for r in results), len(results), record.to_dict()["changed_layers"], record.seconds, passes,
             ", ".join(f"{r.r2_calibration:.3f} (unhealed {r.r2_calibration_unhealed:.3f})" for r in results))
    return record


def _first_hidden(branch: Branch) -> int:
    p = branch.projections[0]
    weight = getattr(p.module, p.weight)
    return weight.shape[1] if p.kind == "conv1d" else weight.shape[-2]


def checked_transform(equations: SplitEquations, ridge: float, check_fit: bool = True,
                      ) -> tuple[torch.Tensor, float, dict]:
    """``(T, lam, check)``: the map fitted on the fit windows must beat the plain prune (T = I) on the check
    windows; then it is refitted on all windows (``equations.fit`` absorbs the check windows), else T = I.
    ``check_fit=False``: no check, the map fitted on all windows."""
    eye = torch.eye(equations.fit.hidden, dtype=torch.float64, device=equations.fit.gram.device)
    check = {"check_tokens": equations.check.tokens, "folded": True}
    if equations.check.tokens and check_fit:
        fitted, _ = equations.fit.solve(ridge)
        check.update(r2_check=equations.check.r2(fitted), r2_check_unhealed=equations.check.r2(eye))
        check["folded"] = check["r2_check"] > check["r2_check_unhealed"]
    equations.fit.absorb(equations.check)
    if not check["folded"]:
        return eye, 0.0, check
    transform, lam = equations.fit.solve(ridge)
    return transform, lam, check


def _solve_and_fold(a: int, b: int, branch: Branch, capture: _RunCapture, equations: SplitEquations,
                    ridge: float, check_fit: bool) -> HealedRun:
    transform, lam, check = checked_transform(equations, ridge, check_fit)
    eye = torch.eye(equations.fit.hidden, dtype=torch.float64, device=transform.device)
    whole = equations.fit
    run = HealedRun(list(range(a, b + 1)), a - 1, branch.name, [p.name for p in branch.projections],
                    whole.tokens, lam, whole.r2(transform), whole.r2(eye), transform=transform.cpu(), **check)
    if run.folded:
        fold(branch, transform, capture.probe)
    else:
        log.warning("heal linear: run %s left unhealed: its map, fitted on %d tokens, predicts the %d check tokens "
                    "worse than the plain prune (R^2 %.3f against %.3f); give more --heal-samples", run.layers,
                    whole.tokens - run.check_tokens, run.check_tokens, run.r2_check, run.r2_check_unhealed)
    return run


@contextmanager
def healed_bypass(model: nn.Module, batches: Sequence[Batch], removed: Sequence[int], ridge: float = DEFAULT_RIDGE,
                  targets: str = "sequential", weighting: str = DEFAULT_HEAL_WEIGHTING, check: bool = True,
                  ) -> Iterator[HealRecord]:
    """Within the block, ``removed`` are bypassed and healed; the folded weights are restored on exit."""
    runs = removed_runs(removed)
    check_healable(removed)
    saved = {}
    decoder = find_decoder_layers(model)
    for a, _ in runs:
        for name, param in decoder.modules[a - 1].named_parameters():
            saved[(a - 1, name)] = param.detach().clone()
    try:
        record = heal_layers(model, batches, removed, ridge, targets, weighting, check)
        with bypass_layers(model, removed):
            yield record
    finally:
        for (index, name), tensor in saved.items():
            decoder.modules[index].get_parameter(name).data.copy_(tensor)


def fit_healed_weights(model: nn.Module, batches: Sequence[Batch], removed: Sequence[int],
                       ridge: float = DEFAULT_RIDGE, weighting: str = DEFAULT_HEAL_WEIGHTING,
                       ) -> tuple[HealRecord, dict[str, torch.Tensor]]:
    """Fit ``removed``'s heal on ``batches`` and return its record (transforms dropped) and the parameters the
    fold changed, by name; ``model`` is left as it was. The held-out search swaps these in to score a set healed."""
    decoder = find_decoder_layers(model)
    names = {id(param): name for name, param in model.named_parameters()}
    before = {names[id(param)]: param.detach().clone()
              for a, _ in removed_runs(removed) for param in decoder.modules[a - 1].parameters()}
    with healed_bypass(model, batches, removed, ridge, weighting=weighting) as record:
        params = dict(model.named_parameters())
        changed = {name: params[name].detach().clone() for name, old in before.items()
                   if not torch.equal(params[name], old)}
    for run in record.runs:
        run.transform = None
    return record, changed


def search_healer(method: str, ridge: float = DEFAULT_RIDGE, weighting: str = DEFAULT_HEAL_WEIGHTING):
    """The held-out searcher's ``healer`` for ``--heal`` (None for ``none``): every candidate set scored healed."""
    return None if method == "none" else partial(fit_healed_weights, ridge=ridge, weighting=weighting)


# -- GGUF export of a healed prune -----------------------------------------------------------------------
GGUF_CHANGED = r"^blk\.(\d+)\.ffn_down"  # gguf-py's names of the MLP output projections (dense, experts, shared)


def can_requantize(tensor_type) -> bool:
    """Whether gguf-py has its own quantizer for ``tensor_type`` (K- and IQ-quants mostly have none)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants

    block = GGML_QUANT_SIZES[tensor_type][0]
    try:
        quants.quantize(np.zeros((1, block), dtype=np.float32), tensor_type)
    except (NotImplementedError, quants.QuantError):
        return False
    return True


def check_gguf_healable(reader) -> None:
    """Before any work: ``--export gguf --heal linear`` re-quantizes the changed MLP output projections in
    their own type, so every ``blk.N.ffn_down*`` tensor's type needs a gguf-py quantizer."""
    import re

    missing = sorted({t.tensor_type.name for t in reader.tensors
                      if re.match(GGUF_CHANGED, t.name) and not can_requantize(t.tensor_type)})
    if missing:
        raise SimdiffError(f"--export gguf with --heal linear must re-quantize the healed ffn_down tensors, but "
                           f"gguf-py has no quantizer for {', '.join(missing)}; drop --export gguf (convert the "
                           "healed safetensors output with llama.cpp) or use --heal none")


def healed_gguf_tensors(reader, folder, heal: dict) -> dict[str, object]:
    """``{GGUF tensor name (the input's block numbering): raw data}`` of every tensor healing changed, read
    from the saved checkpoint in ``folder`` and quantized to the GGUF tensor's own type by gguf-py."""
    import numpy as np
    from gguf import quants
    from safetensors import safe_open

    by_name = {t.name: t for t in reader.tensors}
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as shard:
            weights.update({k: shard.get_tensor(k) for k in shard.keys()})  # noqa: SIM118
    out: dict[str, object] = {}
    for run in heal.get("runs", []):
        if not run.get("folded", True):
            continue  # left unhealed by the check: its tensors are the input's
        for projection in run["projections"]:
            suffix = f".{run['folded_into_saved_index']}.{projection}.weight"
            keys = [k for k in weights if k.endswith(suffix)]
            name = f"blk.{run['folded_into']}.ffn_down.weight"
            if len(keys) != 1 or name not in by_name:
                raise SimdiffError(f"--export gguf: cannot match the healed {projection} of layer "
                                   f"{run['folded_into']} to a GGUF tensor ({name}); use --heal none")
            tensor = by_name[name]
            values = weights[keys[0]].float().numpy().astype(np.float32)
            data = quants.quantize(values, tensor.tensor_type)
            if data.shape != tensor.data.shape:
                raise SimdiffError(f"--export gguf: the healed {keys[0]} {tuple(values.shape)} does not fit the "
                                   f"GGUF tensor {name} {tuple(tensor.shape)}; use --heal none")
            out[name] = data
    return out
