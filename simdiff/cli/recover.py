"""``simdiff recover``: LoRA fine-tuning of a pruned model (runs under ``accelerate launch`` unchanged)."""

from __future__ import annotations

import argparse

from simdiff.cli.options import add_fields, add_model_options, add_output_options, section_from
from simdiff.config.recover import RecoverConfig
from simdiff.config.settings import Evaluation
from simdiff.core.errors import SimdiffError


def add_recover_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover", help="LoRA fine-tuning of a (pruned) model, merged into a plain checkpoint",
        description="LoRA fine-tuning (peft) on packed text windows, then merge_and_unload and an atomic, "
                    "verified save. Training text is WikiText-2's *validation* split (or --data FILE); "
                    "perplexity before/after is measured on WikiText-2 *test*, which is never trained on. "
                    "For several GPUs run it under `accelerate launch -m simdiff recover ...` (data parallel).")
    add_model_options(parser, only=["name", "dtype"])
    add_output_options(parser)
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="save the peft LoRA adapter instead of merging it into the weights (default: merge)")
    add_fields(parser, RecoverConfig, "training and LoRA")
    track = parser.add_argument_group("checkpoints")
    track.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints)")
    track.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="continue from the newest checkpoint in --checkpoint-dir, or from the given one "
                            "(default: start afresh)")
    add_fields(parser, Evaluation, "perplexity before/after (WikiText-2 test)")
    parser.set_defaults(run=run_recover)


def run_recover(args: argparse.Namespace) -> None:
    from simdiff.recover.api import recover

    config = section_from(RecoverConfig, args)
    evaluation = section_from(Evaluation, args)
    if args.out is None:
        raise SimdiffError("give --out DIR: the folder the recovered model is written to")
    result = recover(args.model, args.out, config, evaluation, merged=args.merge, overwrite=args.overwrite,
                     checkpoint_dir=args.checkpoint_dir, resume=args.resume, dtype=args.dtype)
    if result.out is None:  # not the main process under accelerate launch
        return
    train = result.train
    print(f"trained LoRA for {config.steps - train.start_step} steps (from step {train.start_step}) in "
          f"{train.seconds:.1f} s on {train.processes} process(es)")
    print(f"WikiText-2 test perplexity ({result.eval_tokens} tokens): {result.perplexity_before:.3f} before, "
          f"{result.perplexity_after:.3f} after recovery")
    what = "merged checkpoint" if args.merge else "LoRA adapter"
    print(f"saved {what} to {result.out} (loss curves: {result.out}/recovery_loss.png)")
