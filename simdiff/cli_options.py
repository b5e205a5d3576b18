"""Option groups shared by the CLI commands, and their conversion into API objects.

The criterion options are generated from the :class:`simdiff.criteria.Options` dataclass, so the CLI and
the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses

from simdiff.api import Calibration
from simdiff.criteria import CRITERIA, NORMALIZERS, Options
from simdiff.criteria.simdiff import DIFF_SCALES
from simdiff.model.load import DTYPES
from simdiff.tune import OBJECTIVES, SearchSettings

OPTION_HELP = {
    "alpha": "SimDiff weight of the similarity term (1 - alpha goes to the difference terms)",
    "beta": "SimDiff weight of MSSD within the difference term (1 - beta goes to MASD)",
    "normalize": "how each SimDiff metric is normalised across layers",
    "diff_scale": "MSSD/MASD of y - x in the model's scale, or relative to each token's input RMS",
    "seed": "seed for calibration sampling and the random criterion",
}
DTYPE_HELP = "weights' dtype (default: auto, the checkpoint's own; statistics are float32 either way)"
OPTION_CHOICES = {"normalize": list(NORMALIZERS), "diff_scale": list(DIFF_SCALES)}


def add_model_options(parser: argparse.ArgumentParser, offload: bool = False) -> None:
    parser.add_argument("model", help="model directory, hub id (org/name), or built-in name (smollm2-135m)")
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    group.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    group.add_argument("--device-map", default=None, help="accelerate placement, e.g. auto (several GPUs + CPU)")
    group.add_argument("--revision", default=None, help="hub model: branch, tag or commit (a token comes from $HF_TOKEN)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="run the model's own Python code (auto_map); only for sources you trust")
    if offload:
        group.add_argument("--offload", default=None, choices=["layerwise"],
                           help="layerwise: keep the model in CPU memory and score it one decoder layer at a time "
                                "on --device (for models bigger than device memory)")


def source_from(args: argparse.Namespace) -> dict:
    """``load_model`` keyword arguments naming where the model comes from (``--revision``, ``--trust-remote-code``)."""
    return {"revision": getattr(args, "revision", None), "trust_remote_code": getattr(args, "trust_remote_code", False)}


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="folder holding wikitext-2/ and piqa/ (default: $SIMDIFF_DATA_DIR, else download)")


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    defaults = Calibration()
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib", default=defaults.source,
                       help="wikitext2 (validation split), or a .txt/.jsonl file or folder")
    group.add_argument("--samples", type=int, default=defaults.samples, help="number of calibration windows")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window (BOS included)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--heldout-samples", type=int, default=defaults.heldout_samples,
                       help="held-out windows (cut from the end of the calibration text, disjoint from the scoring "
                            f"windows) for --alpha auto and --criterion best-of (default: {defaults.heldout_samples})")
    group.add_argument("--skip-first-token", action=argparse.BooleanOptionalAction, default=defaults.skip_first_token,
                       help="leave position 0 of each window (BOS / attention sink) out of the layer statistics "
                            f"(default: {defaults.skip_first_token})")
    add_data_dir_option(group)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """How --alpha auto and --criterion best-of choose on held-out calibration windows (simdiff.tune)."""
    defaults = SearchSettings()
    group = parser.add_argument_group("held-out selection (--alpha auto, --criterion best-of)")
    group.add_argument("--objective", default=defaults.objective, choices=list(OBJECTIVES),
                       help="kl: mean KL(dense || pruned) of next-token distributions; ppl: perplexity "
                            f"(default: {defaults.objective})")
    group.add_argument("--max-candidates", type=int, default=defaults.max_candidates,
                       help=f"most distinct alpha-path sets evaluated (default: {defaults.max_candidates})")
    group.add_argument("--pool", default=",".join(defaults.pool),
                       help="criteria best-of pools; simdiff stands for its whole alpha path; ppl_skip and taylor add "
                            f"their passes (default: {','.join(defaults.pool)})")


def search_from(args: argparse.Namespace) -> SearchSettings:
    pool = tuple(name.strip() for name in args.pool.split(",") if name.strip())
    return SearchSettings(objective=args.objective, max_candidates=args.max_candidates, pool=pool)


def add_criterion_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`Options` (``--alpha``, ``--beta``, ``--normalize``, ``--diff-scale``, ``--seed``)."""
    group = parser.add_argument_group("criterion options")
    for f in dataclasses.fields(Options):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": f.default, "help": f"{OPTION_HELP[f.name]} (default: {f.default})"}
        if f.name in OPTION_CHOICES:
            kwargs["choices"] = OPTION_CHOICES[f.name]
        elif f.name == "alpha":
            kwargs["type"] = alpha_value
            kwargs["help"] += ("; 'auto' evaluates every distinct selection along alpha in [0, 1] on held-out "
                               "calibration windows (--objective) and keeps the best")
        else:
            kwargs["type"] = type(f.default)
        group.add_argument(flag, **kwargs)


def alpha_value(text: str) -> float | str:
    """``--alpha``: a number, or ``auto`` (tuned per model and layer count, see simdiff.tune)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def layer_list(text: str) -> list[int]:
    """``--layers``: comma-separated decoder-layer indices, e.g. ``3,12,13``."""
    layers = [part.strip() for part in text.split(",") if part.strip()]
    if not layers or not all(part.isdigit() for part in layers):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,12,13, got {text!r}")
    return [int(part) for part in layers]


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection")
    count = group.add_mutually_exclusive_group(required=True)
    count.add_argument("--num-layers", type=int, help="number of decoder layers to remove")
    count.add_argument("--ratio", type=float, help="fraction of decoder layers to remove (rounded)")
    count.add_argument("--layers", type=layer_list,
                       help="remove exactly these layers, e.g. 3,12,13 (the input model's numbering; no scoring)")
    group.add_argument("--criterion", default="simdiff",
                       help=f"one of: {', '.join(CRITERIA)}; or best-of (the best of --pool on held-out windows)")
    group.add_argument("--iterative", action="store_true", help="re-score after each removal (one layer at a time)")
    group.add_argument("--keep-first", type=int, default=0, help="never remove the first N layers")
    group.add_argument("--keep-last", type=int, default=0, help="never remove the last N layers")


def options_from(args: argparse.Namespace) -> Options:
    return Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options)})


def calibration_from(args: argparse.Namespace) -> Calibration:
    return Calibration(source=args.calib, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                       seed=args.seed, data_dir=args.data_dir, heldout_samples=args.heldout_samples,
                       skip_first_token=args.skip_first_token)
