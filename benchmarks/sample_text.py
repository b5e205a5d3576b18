"""Text sampled from a model itself (ancestral sampling at temperature 1 from its BOS token), written as one
calibration file: what ``--calib`` reads when no text of the model's own use is at hand.

Measured in docs/recovery.md ("How many tokens the heal needs"): as ``--heal linear``'s calibration it heals
far less than WikiText-2 or a mixed folder, and still hurts the Python text; it is not offered as an option.

    python benchmarks/sample_text.py --windows 64 --tokens 512 --out self.txt
    python benchmarks/heal_calibration.py --removed 3,12,13,14,16,17,25,26 --variants self.txt@1e-4@56x512 ...
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from simdiff.model import load_model

log = logging.getLogger("sample_text")


def sample(model, tokenizer, windows: int, tokens: int, seed: int, batch: int = 16) -> list[str]:
    """``windows`` texts of ``tokens`` sampled tokens each (seeded), decoded without special tokens."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    texts: list[str] = []
    while len(texts) < windows:
        ids = torch.full((min(batch, windows - len(texts)), 1), start)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=start)
        texts += [tokenizer.decode(row[1:], skip_special_tokens=True) for row in out]
        log.info("sampled %d of %d texts", len(texts), windows)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new --out")
    model, tokenizer = load_model(args.model)
    text = "\n\n".join(sample(model, tokenizer, args.windows, args.tokens, args.seed))
    partial = out.with_name(out.name + ".partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
