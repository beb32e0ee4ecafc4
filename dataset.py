"""A dataset folder written by prepare_audio.py (meta.json + uint16 shards), read as windows of tokens. No writes.

    from dataset import load_dataset, train_starts
    meta, streams = load_dataset("data/sherlock")             # one TokenStream per split, checked against meta.json
    x = streams["train"].read(train_starts(1337, it, 64, len(streams["train"]) - 2048), 2049)   # (64, 2049) int64

The data order is a function of (seed, iteration) alone: that gives exact resume and the same model on 1 or N
processes. Errors are ValueError with a message for the user.
"""
from __future__ import annotations

import json
import os

import numpy as np

from tokenizer import Layout

class TokenStream:
    """The shards of one split as one stream of len(self) tokens; windows may cross shard ends."""

    def __init__(self, paths: list[str], sizes: list[int]):
        keep = [i for i, n in enumerate(sizes) if n > 0]  # an empty file cannot be memory-mapped
        self.paths = [paths[i] for i in keep]
        self.sizes = np.array([sizes[i] for i in keep], dtype=np.int64)
        self.ends = np.cumsum(self.sizes)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows [s, s+length) for each s in starts -> int64 (len(starts), length).

        The memmaps are opened per call and dropped after it, as in nanoGPT: a long-lived memmap keeps every page
        it ever touched mapped, so resident memory would grow towards the dataset size."""
        out = np.empty((len(starts), length), dtype=np.int64)
        maps: dict[int, np.memmap] = {}
        for row, start in enumerate(starts):
            i, pos = int(np.searchsorted(self.ends, start, side="right")), 0
            while pos < length:
                if i not in maps:
                    maps[i] = np.memmap(self.paths[i], dtype="<u2", mode="r")
                offset = start + pos - (self.ends[i] - self.sizes[i])
                take = int(min(length - pos, self.sizes[i] - offset))
                out[row, pos:pos + take] = maps[i][offset:offset + take]
                pos, i = pos + take, i + 1
        return out


def load_dataset(data_dir: str) -> tuple[dict, dict[str, TokenStream]]:
    """meta.json and one TokenStream per split; every shard is checked against meta.json up front."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir}: folder not found; write it with "
                        f"`python prepare_audio.py --out_dir={data_dir}` or pass --data_dir=<dataset folder>")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"data_dir {data_dir}: has no meta.json; it must be a dataset folder written by "
                        "prepare_audio.py")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset meta {meta_path}: not readable JSON ({e}); re-run prepare_audio.py") from None
    missing = [k for k in ("vocab_size", "tokens_per_second", "codebook_size", "n_levels", "shards") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing {', '.join(missing)}; re-run prepare_audio.py")
    layout = Layout.from_meta(meta)
    if meta["vocab_size"] != layout.vocab_size or meta.get("dtype", "uint16") != "uint16":
        raise ValueError(f"{meta_path}: vocab_size {meta['vocab_size']} / dtype {meta.get('dtype')} do not match "
                        f"the layout (expected {layout.vocab_size} / uint16); re-run prepare_audio.py")
    streams = {}
    for split in ("train", "val"):
        shards = [s for s in meta["shards"] if s.get("split") == split]
        paths = [os.path.join(data_dir, s["file"]) for s in shards]
        for s, p in zip(shards, paths):
            if not os.path.isfile(p):
                raise ValueError(f"shard {p}: listed in meta.json but not found; re-run prepare_audio.py")
            if os.path.getsize(p) != 2 * int(s["tokens"]):
                raise ValueError(f"shard {p}: {os.path.getsize(p)} bytes, but meta.json says {s['tokens']} tokens "
                                f"({2 * int(s['tokens'])} bytes of uint16); the dataset is damaged, re-run "
                                "prepare_audio.py")
        streams[split] = TokenStream(paths, [int(s["tokens"]) for s in shards])
    return meta, streams


def train_starts(seed: int, it: int, n_windows: int, n_starts: int) -> np.ndarray:
    """Start offsets of every window of iteration `it` of the whole job: a function of (seed, it) only."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, it)))
    return rng.integers(0, n_starts, size=n_windows)


def eval_starts(seed: int, n_windows: int, n_starts: int) -> np.ndarray:
    """The fixed val windows; when the split has no more possible windows than that, every one of them once."""
    if n_starts <= n_windows:
        return np.arange(n_starts)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))).integers(0, n_starts, size=n_windows)
