"""How far apart the cached and uncached logits of greedy decoding are, in units of the dtype's eps.

    python benchmarks/kv_cache_ties.py --model smollm2-135m --dtype bfloat16
    python benchmarks/kv_cache_ties.py --model smollm2-135m --dtype float32

The save check (simdiff.store.verify.check_cached_generation) accepts a different greedy token between the two
paths only at a rounding tie; this measures the largest logit difference between the paths at the same
positions, over eps x the largest logit, and the noise of the top-2 margin (the uncached path's two best tokens,
difference of their margins on the two paths) in units in the last place of the dtype at the best logit, which
sets that tolerance (TIE_ULPS, TIE_RELATIVE_FLOOR).
"""

from __future__ import annotations

import argparse

import torch

from simdiff.core.progress import set_progress
from simdiff.model import load_model
from simdiff.model.checks import cache_kwarg
from simdiff.store.verify import prompt_ids, rounding_unit


@torch.no_grad()
def cached_and_uncached_logits(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per greedy step, the logits of the cached path and of one uncached forward over the same prefix."""
    key = cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    steps, tokens = [out.logits[:, -1].float()], [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{key: getattr(out, key)})
        steps.append(out.logits[:, -1].float())
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    sequence = torch.cat([ids, *tokens[:-1]], dim=1)
    uncached = model(input_ids=sequence, use_cache=False).logits[0, ids.shape[1] - 1:].float()
    return torch.cat(steps), uncached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="The history of the Roman Empire begins with")
    args = parser.parse_args()
    set_progress(False)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    dtype = next(model.parameters()).dtype
    cached, uncached = cached_and_uncached_logits(model, prompt_ids(model, tokenizer, args.prompt), args.new_tokens)
    scale = uncached.abs().max(-1).values
    units = ((cached - uncached).abs().max(-1).values / (torch.finfo(dtype).eps * scale)).max().item()
    relative = ((cached - uncached).abs().max(-1).values / scale).max().item()
    print(f"{args.model} {dtype}, {args.new_tokens} greedy steps: largest |cached - uncached| logit = "
          f"{units:.1f} eps x the largest logit ({relative:.2e} relative); largest logit {scale.max().item():.1f}; "
          f"largest top-2 margin noise {top2_margin_noise(cached, uncached, dtype):.1f} ulps of the best logit")


def top2_margin_noise(cached: torch.Tensor, uncached: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |cached margin - uncached margin| of the uncached path's two best tokens, in ulps of the best."""
    worst = 0.0
    for c, u in zip(cached, uncached):
        a, b = u.topk(2).indices
        noise = abs(float((c[a] - c[b]) - (u[a] - u[b])))
        worst = max(worst, noise / rounding_unit(float(u[a]), dtype))
    return worst


if __name__ == "__main__":
    main()
