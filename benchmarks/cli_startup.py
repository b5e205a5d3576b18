"""Command-line start-up: median wall time of 5 fresh processes of `simdiff --version` and
`simdiff prune --help`, beside `python -c pass` (the interpreter's own start).

    PYTHONPATH=. python benchmarks/cli_startup.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = 5
COMMANDS = {"python -c pass": ["-c", "pass"], "simdiff --version": ["-m", "simdiff", "--version"],
            "simdiff prune --help": ["-m", "simdiff", "prune", "--help"]}


def median_seconds(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    base = None
    for name, args in COMMANDS.items():
        seconds = median_seconds(args)
        base = base or seconds
        print(f"{name:22s} {seconds:6.3f} s  ({seconds / base:4.1f}x python -c pass)")


if __name__ == "__main__":
    main()
