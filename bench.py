"""Throughput benchmarks. Every figure is printed beside its baseline measured in the same run, as a ratio,
because shared machines are noisy.

    python bench.py                 # everything
    python bench.py tokenizer       # one part: tokenizer, prepare, train, generate
"""
from __future__ import annotations

import sys
import time


def timeit(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def row(name: str, ours: float, base: float, unit: str, higher_is_better: bool = True) -> None:
    ratio = ours / base if higher_is_better else base / ours
    print(f"{name:<52} {ours:>12.4g} {unit:<10} baseline {base:>12.4g}   ratio {ratio:>8.2f}x", flush=True)


# --- tokenizer ---------------------------------------------------------------
def bench_tokenizer() -> None:
    raise NotImplementedError


# --- prepare ------------------------------------------------------------------
def bench_prepare() -> None:
    raise NotImplementedError


# --- train --------------------------------------------------------------------
def bench_train() -> None:
    raise NotImplementedError


# --- generate -----------------------------------------------------------------
def bench_generate() -> None:
    raise NotImplementedError


PARTS = {"tokenizer": bench_tokenizer, "prepare": bench_prepare, "train": bench_train, "generate": bench_generate}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PARTS)
    for name in names:
        if name not in PARTS:
            raise SystemExit(f"error: unknown benchmark '{name}' (choose from {', '.join(PARTS)})")
        print(f"== {name} ==", flush=True)
        PARTS[name]()
