"""A dataset folder written by prepare_audio.py (meta.json + uint16 or uint32 shards), read as windows of tokens, and
the val figures of a model on it. No writes.

    from dataset import load_dataset, train_starts
    meta, streams = load_dataset("data/sherlock")             # one TokenStream per split, checked against meta.json
    x = streams["train"].read(train_starts(1337, it, 64, len(streams["train"]) - 2048), 2049)   # (64, 2049) int64

The data order is a function of (seed, iteration) alone: that gives exact resume and the same model on 1 or N
processes. Errors are ValueError with a message for the user.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer import Layout, load_text_encoding, text_token_bytes

# shards are raw little-endian ids with no header: uint16 while every id of the vocabulary fits, else uint32 (a
# text encoding of more than 65k ids: cl100k_base, o200k_base); meta.json's "dtype" names which
SHARD_DTYPES = {"uint16": "<u2", "uint32": "<u4"}


def shard_dtype(vocab_size: int) -> str:
    """The dtype name prepare_audio.py writes for a vocabulary: the smallest in SHARD_DTYPES that holds every id
    (the reader takes any that holds them)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenStream:
    """The shards of one split as one stream of len(self) tokens; windows may cross shard ends."""

    def __init__(self, paths: list[str], sizes: list[int], dtype: str = "uint16", masks: list[str] | None = None):
        self.dtype = SHARD_DTYPES[dtype]
        keep = [i for i, n in enumerate(sizes) if n > 0]  # an empty file cannot be memory-mapped
        self.paths = [paths[i] for i in keep]
        self.masks = [masks[i] for i in keep] if masks else None  # loss masks beside the shards (conversations)
        self.sizes = np.array([sizes[i] for i in keep], dtype=np.int64)
        self.ends = np.cumsum(self.sizes)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, starts: np.ndarray, length: int, mask: bool = False) -> np.ndarray:
        """Windows [s, s+length) for each s in starts -> int64 (len(starts), length); mask: of the loss masks.

        The memmaps are opened per call and dropped after it, as in nanoGPT: a long-lived memmap keeps every page
        it ever touched mapped, so resident memory would grow towards the dataset size."""
        paths, dtype = (self.masks, "u1") if mask else (self.paths, self.dtype)
        out = np.empty((len(starts), length), dtype=np.int64)
        maps: dict[int, np.memmap] = {}
        for row, start in enumerate(starts):
            i, pos = int(np.searchsorted(self.ends, start, side="right")), 0
            while pos < length:
                if i not in maps:
                    maps[i] = np.memmap(paths[i], dtype=dtype, mode="r")
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
    tps = meta["tokens_per_second"]
    if isinstance(tps, bool) or not isinstance(tps, (int, float)) or not 0 < tps < math.inf:
        raise ValueError(f"{meta_path}: tokens_per_second={tps!r}, expected a number above 0 (the codec's frames per "
                         "second x tokens per frame); re-run prepare_audio.py")
    if not isinstance(meta["shards"], list) or not all(isinstance(s, dict) for s in meta["shards"]):
        raise ValueError(f"{meta_path}: 'shards' must be a list of {{file, split, tokens}}; re-run prepare_audio.py")
    for s in meta["shards"]:
        name, tokens = s.get("file"), s.get("tokens")
        # a plain name inside the folder: meta.json must not point the reader at any other file
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or \
                os.path.basename(name) != name or "\0" in name:
            raise ValueError(f"{meta_path}: shard file {name!r} is not a plain file name inside {data_dir} (no "
                             "folders, no ..); re-run prepare_audio.py")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"{meta_path}: shard {name}: tokens={tokens!r}, expected a count >= 0; re-run "
                             "prepare_audio.py")
    layout = Layout.from_meta(meta)
    dtype = meta.get("dtype", "uint16")
    if meta["vocab_size"] != layout.vocab_size or dtype not in SHARD_DTYPES or \
            np.iinfo(SHARD_DTYPES[dtype]).max < layout.vocab_size - 1:
        raise ValueError(f"{meta_path}: vocab_size {meta['vocab_size']} / dtype {meta.get('dtype')} do not match "
                        f"the layout (expected {layout.vocab_size} / {shard_dtype(layout.vocab_size)}); re-run "
                        "prepare_audio.py")
    width = np.dtype(SHARD_DTYPES[dtype]).itemsize
    streams = {}
    for split in ("train", "val"):
        shards = [s for s in meta["shards"] if s.get("split") == split]
        paths = [os.path.join(data_dir, s["file"]) for s in shards]
        for s, p in zip(shards, paths):
            if not os.path.isfile(p):
                raise ValueError(f"shard {p}: listed in meta.json but not found; re-run prepare_audio.py")
            if os.path.getsize(p) != width * int(s["tokens"]):
                raise ValueError(f"shard {p}: {os.path.getsize(p)} bytes, but meta.json says {s['tokens']} tokens "
                                f"({width * int(s['tokens'])} bytes of {dtype}); the dataset is damaged, re-run "
                                "prepare_audio.py")
        masks = [os.path.join(data_dir, str(s["mask"])) for s in shards if "mask" in s]
        for s, p in zip(shards, masks):
            if os.path.basename(p) != s["mask"] or not os.path.isfile(p) or os.path.getsize(p) != int(s["tokens"]):
                raise ValueError(f"loss mask {p}: missing or not {s['tokens']} bytes (one per token of {s['file']}); "
                                "the dataset is damaged, re-run prepare_audio.py")
        if masks and len(masks) != len(shards):
            raise ValueError(f"{meta_path}: only some {split} shards have a loss mask; re-run prepare_audio.py")
        streams[split] = TokenStream(paths, [int(s["tokens"]) for s in shards], dtype, masks)
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


# -----------------------------------------------------------------------------
# batches and eval

def get_batch(stream: TokenStream, starts: np.ndarray, block: int, device: str,
              vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of block + 1 tokens -> inputs x and targets y, (B, block) each, on device."""
    batch = stream.read(starts, block + 1)  # (B, block + 1)
    if batch.max(initial=0) >= vocab_size:
        raise ValueError(f"token id {batch.max()} >= vocab_size {vocab_size}: the shards do not match meta.json; "
                        "re-run prepare_audio.py")
    x = batch
    if stream.masks:  # conversations: targets the loss does not count (user and system turns) become -1
        batch = np.where(stream.read(starts, block + 1, mask=True) > 0, batch, -1)
        batch = np.stack([x, batch])  # (2, B, block + 1): inputs, then targets
    t = torch.from_numpy(batch)
    # pinned memory lets the copy overlap with compute; one copy of the windows, sliced on the device
    t = t.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else t.to(device)
    return (t[0, :, :-1], t[1, :, 1:]) if stream.masks else (t[:, :-1], t[:, 1:])


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: TokenStream, starts: np.ndarray, block: int, batch_size: int,
             meta: dict, device: str, dtype: str, ddp: bool, text_bytes: torch.Tensor | None = None,
             steps: int = 0) -> dict:
    """Val loss over this rank's share of the fixed windows; the sums are all-reduced, so every rank and every
    world size get the same figures. Tokens are grouped by their TARGET id (Layout.groups): each audio level,
    text, special. Bits per second count audio targets only; bits per byte count text targets, over the bytes
    of those targets (text_bytes: (vocab_size,) bytes per id, from the text encoding). steps: run at least this
    many forward passes (a sharded model's ranks must run as many), the ones past this rank's windows discarded."""
    layout = Layout.from_meta(meta)
    n_groups = len(layout.group_names)
    acc = torch.float32 if device == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(3, n_groups, device=device, dtype=acc)  # [loss sum, token count, text bytes] per group
    model.eval()
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(stream, starts[i:i + batch_size], block, device, int(meta["vocab_size"]))
        with torch.autocast("cuda", getattr(torch, dtype)) if dtype != "float32" else nullcontext():
            logits, _ = model(x, y)
        y = y.reshape(-1)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y, reduction="none", ignore_index=-1)
        counted = y >= 0  # a masked target (-1: a user turn's) is in no group
        loss, y = loss[counted], y[counted]
        group = layout.groups(y)
        sums[0].index_add_(0, group, loss.to(acc))
        sums[1].index_add_(0, group, torch.ones_like(loss, dtype=acc))
        if text_bytes is not None:
            sums[2].index_add_(0, group, text_bytes[y].to(acc))
    for _ in range(steps - -(-len(starts) // batch_size)):
        with torch.autocast("cuda", getattr(torch, dtype)) if dtype != "float32" else nullcontext():
            model(torch.zeros(1, block, dtype=torch.long, device=device))
    model.train()
    if ddp:
        torch.distributed.all_reduce(sums)
    loss_sum, count, nbytes = sums.cpu().tolist()
    n_levels, text = layout.n_levels, layout.n_levels  # groups: L0 .. L{n-1}, text, special
    audio_loss = sum(loss_sum[:n_levels]) / max(1.0, sum(count[:n_levels]))
    row = {"val_loss": sum(loss_sum) / max(1.0, sum(count)), "val_audio_loss": audio_loss,
           "val_bps": audio_loss * float(meta["tokens_per_second"]) / math.log(2),
           "val_loss_levels": {name: s / c for name, s, c in zip(layout.group_names, loss_sum, count) if c > 0}}
    if count[text] > 0:
        row["val_text_loss"] = loss_sum[text] / count[text]  # nats per text token
        if nbytes[text] > 0:
            row["val_text_bpb"] = loss_sum[text] / math.log(2) / nbytes[text]  # bits per byte of text
    return row


def text_bytes_table(meta: dict, device: str) -> torch.Tensor | None:
    """(vocab_size,) bytes of each text id (0 elsewhere) for bits per byte, when the val split holds text."""
    layout = Layout.from_meta(meta)
    if not layout.text_vocab or not meta.get("splits", {}).get("val", {}).get("text_tokens"):
        return None
    enc = load_text_encoding(layout.text_encoding)
    if enc.n_vocab != layout.text_vocab:
        raise ValueError(f"text encoding {layout.text_encoding}: has {enc.n_vocab} ids here but the dataset was "
                        f"written with {layout.text_vocab}; use the tiktoken version that prepared the data")
    table = torch.zeros(layout.vocab_size, dtype=torch.float64)
    table[:layout.text_vocab] = torch.from_numpy(text_token_bytes(enc)).double()
    return table.to(device, torch.float32 if device == "mps" else torch.float64)


def eval_line(row: dict) -> str:
    """train.py's line for an eval row of evaluate()'s figures (and "iter")."""
    levels = " ".join(f"{k} {v:.3f}" for k, v in row["val_loss_levels"].items())
    text = f"text {row['val_text_loss']:.3f} nats/token " if "val_text_loss" in row else ""
    text += f"{row['val_text_bpb']:.3f} bits/byte | " if "val_text_bpb" in row else "| " * bool(text)
    return (f"iter {row['iter']} | val loss {row['val_loss']:.4f} | {row['val_bps']:.0f} bits/s | {text}per level "
            f"{levels}")
