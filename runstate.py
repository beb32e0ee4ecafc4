"""A training run's state: what ckpt.pt (one process) or the ckpt/ folder (--fsdp, one shard per rank) holds, saved,
found and restored.

save_state writes exactly what restore_state reads back, which is what makes a resumed run identical to an
uninterrupted one (weights, optimizer, loss scaler, RNG, and iter_num, which is also the data position since the
data order is a function of (seed, iteration)).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from checkpoints import load_checkpoint, save_checkpoint
from common import atomic_write
from distributed import is_sharded, load_consolidated, load_sharded, read_state, save_sharded
from model import GPT


def save_state(paths: list[str], model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               cfg, meta: dict, iter_num: int, best_val_loss: float) -> None:
    """One process writes ckpt.pt (and best.pt); with --fsdp every rank writes its shards of the ckpt/ folder.
    cfg: train.py's TrainConfig (its fsdp and seed, and the whole of it for the record)."""
    ckpt = {"model": {} if cfg.fsdp else model.state_dict(), "model_args": dataclasses.asdict(model.config),
            "optimizer": {} if cfg.fsdp else optimizer.state_dict(), "scaler": scaler.state_dict(),
            "iter_num": iter_num, "best_val_loss": best_val_loss,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []},
            "data": {"seed": cfg.seed, "next_iter": iter_num},
            "config": dataclasses.asdict(cfg), "meta": meta}
    if cfg.fsdp:  # the tensors go to DCP's shards, the rest to state.pt
        save_sharded(paths[0], model, optimizer, {k: v for k, v in ckpt.items() if k != "model"}, copies=paths[1:])
    for path in [] if cfg.fsdp else paths:
        save_checkpoint(path, ckpt)


def restore_state(ckpt: dict, model: GPT, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, sharded: str = "") -> tuple[int, float]:
    """Load what save_state wrote (sharded: the ckpt/ folder whose state.pt is ckpt); returns (iter_num,
    best_val_loss)."""
    if sharded:  # every rank: the shards, resharded to this run's ranks
        load_sharded(sharded, model, optimizer)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():  # empty when the checkpoint's run did not scale (bf16, fp32)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return int(ckpt["iter_num"]), float(ckpt["best_val_loss"])


def find_resume(out_dir: str, fsdp: bool) -> tuple[dict, str]:
    """The state to resume in out_dir: ckpt.pt (a run without --fsdp), the ckpt/ shards (with it), or, when both are
    there, the later one. Returns (state, the shards folder every rank loads, or "" when state holds the weights).
    A run without --fsdp resumes a sharded one whole, gathered into this process."""
    single, sharded = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt")
    found = {path: load_checkpoint(path) if path == single else read_state(path)
             for path in (single, sharded) if os.path.isfile(path) or is_sharded(path)}
    if not found:
        raise ValueError(f"init_from=resume: no checkpoint {sharded if fsdp else single}; train from scratch first "
                         "or fix --out_dir")
    newest = max(found, key=lambda path: (found[path]["iter_num"], path == (sharded if fsdp else single)))
    if fsdp and newest == single:
        raise ValueError(f"init_from=resume: {out_dir} holds ckpt.pt (iteration {found[single]['iter_num']}), written "
                         "without --fsdp; resume it with --fsdp=False, or start a sharded run in a new out_dir")
    if newest == sharded and not fsdp:
        return load_consolidated(sharded), ""
    return found[newest], sharded if fsdp else ""


def trim_log(path: str, iter_num: int) -> None:
    """On resume, drop log lines written after the checkpoint, so the log reads as one uninterrupted run."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if r["iter"] < iter_num or (r["iter"] == iter_num and "val_loss" in r)]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep)), mode="w")


# -----------------------------------------------------------------------------
