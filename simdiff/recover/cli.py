"""``simdiff recover``: LoRA fine-tuning of a pruned model (runs under ``accelerate launch`` unchanged)."""

from __future__ import annotations

import argparse

from simdiff.cli_options import DTYPE_HELP
from simdiff.model.load import DTYPES
from simdiff.recover.config import ALL_LINEAR, RecoverConfig

DEFAULTS = RecoverConfig()


def add_recover_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover", help="LoRA fine-tuning of a (pruned) model, merged into a plain checkpoint",
        description="LoRA fine-tuning (peft) on packed text windows, then merge_and_unload and an atomic, "
                    "verified save. Training text is WikiText-2's *validation* split (or --data FILE); "
                    "perplexity before/after is measured on WikiText-2 *test*, which is never trained on. "
                    "For several GPUs run it under `accelerate launch -m simdiff recover ...` (data parallel).")
    parser.add_argument("model", help="model directory (e.g. the output of `simdiff prune`) or built-in name")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="save the peft LoRA adapter instead of merging it into the weights")
    train = parser.add_argument_group("training")
    train.add_argument("--data", default=DEFAULTS.data,
                       help="training text: wikitext2 (its validation split; test is kept for evaluation) "
                            "or a .txt/.jsonl file or folder")
    train.add_argument("--data-dir", default=None,
                       help="folder holding wikitext-2/ (default: $SIMDIFF_DATA_DIR, else download)")
    train.add_argument("--steps", type=int, default=DEFAULTS.steps, help="optimiser steps")
    train.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="windows per micro-batch "
                       "per process")
    train.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum, help="micro-batches per step")
    train.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="tokens per window (BOS included)")
    train.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate (AdamW)")
    train.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warm-up steps before the cosine decay (default: 10%% of --steps)")
    train.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    train.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, help="gradient clipping")
    train.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for window order and dropout")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=DEFAULTS.rank)
    lora.add_argument("--alpha", type=float, default=DEFAULTS.alpha, help="LoRA scaling numerator (alpha/rank)")
    lora.add_argument("--dropout", type=float, default=DEFAULTS.dropout, help="LoRA dropout")
    lora.add_argument("--target-modules", default=ALL_LINEAR,
                      help="comma-separated module names (e.g. q_proj,v_proj), default: all linear layers "
                           "except the LM head")
    track = parser.add_argument_group("held-out loss, checkpoints and evaluation")
    track.add_argument("--heldout-windows", type=int, default=DEFAULTS.heldout_windows,
                       help="windows at the end of the training text held out for the held-out loss")
    track.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every,
                       help="held-out loss every N steps (0: never)")
    track.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every,
                       help="checkpoint every N steps (0: never)")
    track.add_argument("--keep-checkpoints", type=int, default=DEFAULTS.keep_checkpoints,
                       help="keep only the newest N checkpoints (0: all)")
    track.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints)")
    track.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="continue from the newest checkpoint in --checkpoint-dir, or from the given one")
    track.add_argument("--eval-max-tokens", type=int, default=16384,
                       help="WikiText-2 test tokens for perplexity before/after")
    track.add_argument("--eval-seq-len", type=int, default=None, help="window length for perplexity "
                       "(default: --seq-len)")
    parser.set_defaults(run=run_recover)


def config_from(args: argparse.Namespace) -> RecoverConfig:
    return RecoverConfig(
        data=args.data, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=args.target_modules, seed=args.seed, heldout_windows=args.heldout_windows,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, data_dir=args.data_dir)


def run_recover(args: argparse.Namespace) -> None:
    from simdiff.errors import SimdiffError
    from simdiff.recover.api import Evaluation, recover

    config = config_from(args)
    if args.eval_max_tokens < 1:
        raise SimdiffError(f"--eval-max-tokens must be >= 1, got {args.eval_max_tokens}")
    evaluation = Evaluation(max_tokens=args.eval_max_tokens, seq_len=args.eval_seq_len or args.seq_len,
                            batch_size=args.batch_size, data_dir=args.data_dir)
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
