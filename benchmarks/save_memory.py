"""Memory of saving a pruned model: transformers' write, then simdiff's save check, each over the model's bytes.

    python benchmarks/save_memory.py --model smollm2-135m --remove 8

Peak resident-set growth (VmHWM reset per phase, see simdiff.bench.memory) of ``save_pretrained`` (with
simdiff's shard size) and of the save check (simdiff.store.verify), against the model's bytes and its largest
tensor: the check streams the written tensors one at a time, so its growth should be about one tensor.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from simdiff.bench.memory import track_peak
from simdiff.bench.weights import weight_bytes
from simdiff.core.progress import set_progress
from simdiff.model import load_model
from simdiff.model.layers import find_decoder_layers
from simdiff.store.save import SHARD_SIZE
from simdiff.store.verify import verify_saved
from simdiff.surgery.layers import remove_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=8, help="layers removed (the ones before the last)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    set_progress(False)
    model, tokenizer = load_model(args.model, args.dtype)
    n = len(find_decoder_layers(model))
    remove_layers(model, list(range(n - 1 - args.remove, n - 1)))
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        with track_peak("cpu") as write:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        with track_peak("cpu") as check:
            verify_saved(model, Path(tmp), tokenizer)
    mib = 2**20
    print(f"{args.model} minus {args.remove} layers, {next(model.parameters()).dtype}: model "
          f"{weight_bytes(model) / mib:.1f} MiB, largest tensor {largest / mib:.1f} MiB ({write.method})")
    print(f"save_pretrained growth {write.delta / mib:.1f} MiB ({write.delta / weight_bytes(model):.2f} x model); "
          f"save check growth {check.delta / mib:.1f} MiB ({check.delta / largest:.2f} x largest tensor)")


if __name__ == "__main__":
    main()
