"""Train a GPT-2 on SNAC audio tokens: one GPU, CPU, Apple MPS, or many GPUs under torchrun.

    python train.py configs/sherlock.py                                   # one GPU (or CPU / MPS)
    python train.py configs/sherlock.py --batch_size=4 --gradient_accumulation_steps=16   # a 16 GB card
    python train.py configs/sherlock.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=4 train.py configs/sherlock.py # 4 GPUs, same model as 1 GPU
    python train.py configs/tiny.py --data_dir=data/mine                  # CPU smoke run, about a minute
    python train.py --help                                                # every key with its default

The same command line trains the same model on 1 or N processes: `gradient_accumulation_steps` counts the
micro-steps of the whole job (split among the ranks) and the data order depends only on (seed, iteration).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import (UserError, user_errors, atomic_write, autocast, load_checkpoint, parse_config, pick_device, pick_dtype, read_json,
                    run_main, save_checkpoint, write_json)
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # ckpt.pt (latest), best.pt (lowest val loss), log.jsonl, config.json
    data_dir: str = "data/sherlock"  # written by prepare_audio.py: train_*.bin, val_*.bin, meta.json
    init_from: str = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    eval_interval: int = 250  # evaluate on val and write checkpoints every this many iterations (and at the end)
    eval_iters: int = 20  # val windows = eval_iters * batch_size, the same fixed windows at every eval
    log_interval: int = 10  # print and log the training loss every this many iterations
    wandb_log: bool = False  # also log to Weights & Biases (imported only when on)
    wandb_project: str = "gpt2o"
    wandb_run_name: str = "run"
    # data
    batch_size: int = 8  # sequences per micro-step per process
    block_size: int = 2048  # tokens per sequence (2048 = 25 s of 24 kHz SNAC audio)
    gradient_accumulation_steps: int = 8  # micro-steps per iteration for the WHOLE job, divided among the ranks
    # model (vocab_size comes from the dataset's meta.json)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for large data; small data wants 0.1-0.2
    bias: bool = False  # biases in Linear/LayerNorm layers
    # AdamW, warmup then cosine decay
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 5000  # optimizer steps in total
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    warmup_iters: int = 200  # linear warmup from ~0 to learning_rate
    lr_decay_iters: int = 0  # cosine decay ends here, then min_lr; 0 = max_iters
    min_lr: float = 6e-5  # about learning_rate / 10, as in Chinchilla
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bfloat16 where supported, float16 + GradScaler on older GPUs, float32 off CUDA)
    compile: bool = True  # torch.compile the model; only used on CUDA (slow to start and little gain elsewhere)
    peak_flops: float = 0.0  # the device's peak FLOP/s for the MFU figure; 0 = look up the GPU, or measure a matmul
    seed: int = 1337  # model init, data order and dropout all derive from it


# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the MFU figure. First match wins,
# so longer names come first. In float32 (TF32) the peak is taken as half of these (true for A100/H100).
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
    ("4090", 165e12), ("4080", 97e12), ("3090", 71e12), ("3080", 59e12),
]


def measure_matmul_flops(device: str, dtype: torch.dtype = torch.float32, n: int = 1024, repeat: int = 3) -> float:
    """Achieved FLOP/s of an n x n matmul on `device`: the practical peak on CPUs and unknown GPUs."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else torch.mps.synchronize if device == "mps" else None
    best = float("inf")
    for _ in range(repeat + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        a @ b
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops_for(device: str, dtype: str, override: float) -> float:
    if override > 0:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops if dtype != "float32" else flops / 2
    return measure_matmul_flops(device, getattr(torch, dtype))


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# -----------------------------------------------------------------------------
# data: every shard of a split is one virtual concatenated stream, read through np.memmap

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
        raise UserError(f"data_dir {data_dir}: folder not found; write it with "
                        f"`python prepare_audio.py --out_dir={data_dir}` or pass --data_dir=<dataset folder>")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"data_dir {data_dir}: has no meta.json; it must be a dataset folder written by prepare_audio.py")
    meta = read_json(meta_path, "dataset meta")
    from tokenizer import Layout
    missing = [k for k in ("vocab_size", "tokens_per_second", "codebook_size", "n_levels", "shards") if k not in meta]
    if missing:
        raise UserError(f"{meta_path}: missing {', '.join(missing)}; re-run prepare_audio.py")
    with user_errors():
        layout = Layout.from_meta(meta)
    if meta["vocab_size"] != layout.vocab_size or meta.get("dtype", "uint16") != "uint16":
        raise UserError(f"{meta_path}: vocab_size {meta['vocab_size']} / dtype {meta.get('dtype')} do not match "
                        f"the layout (expected {layout.vocab_size} / uint16); re-run prepare_audio.py")
    streams = {}
    for split in ("train", "val"):
        shards = [s for s in meta["shards"] if s.get("split") == split]
        paths = [os.path.join(data_dir, s["file"]) for s in shards]
        for s, p in zip(shards, paths):
            if not os.path.isfile(p):
                raise UserError(f"shard {p}: listed in meta.json but not found; re-run prepare_audio.py")
            if os.path.getsize(p) != 2 * int(s["tokens"]):
                raise UserError(f"shard {p}: {os.path.getsize(p)} bytes, but meta.json says {s['tokens']} tokens "
                                f"({2 * int(s['tokens'])} bytes of uint16); the dataset is damaged, re-run prepare_audio.py")
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


def to_device(batch: np.ndarray, device: str, vocab_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token windows -> inputs x and targets y, (B, T) each, on device."""
    if batch.max(initial=0) >= vocab_size:
        raise UserError(f"{split} shards: token id {batch.max()} >= vocab_size {vocab_size}; the shards do not match meta.json")
    t = torch.from_numpy(batch)
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t[:, :-1], t[:, 1:]  # one copy of the (B, T+1) windows, sliced on the device


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: TokenStream, starts: np.ndarray, block: int, cfg: TrainConfig,
             meta: dict, device: str, dtype: str, ddp: bool) -> dict:
    """Val loss over this rank's share of the fixed windows; the sums are all-reduced, so every rank and every
    world size get the same figures. Per-level losses group tokens by the level of the TARGET token
    (id // codebook_size); boundary tokens are the 'special' group."""
    n_levels, cb = int(meta["n_levels"]), int(meta["codebook_size"])
    acc = torch.float32 if device == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(2, n_levels + 1, device=device, dtype=acc)  # [loss sum, token count] per group
    model.eval()
    for i in range(0, len(starts), cfg.batch_size):
        x, y = to_device(stream.read(starts[i:i + cfg.batch_size], block + 1), device, int(meta["vocab_size"]), "val")
        with autocast(device, dtype):
            logits, _ = model(x, y)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        group = torch.clamp(y.reshape(-1) // cb, max=n_levels)
        sums[0].index_add_(0, group, loss.to(acc))
        sums[1].index_add_(0, group, torch.ones_like(loss, dtype=acc))
    model.train()
    if ddp:
        torch.distributed.all_reduce(sums)
    loss_sum, count = sums.cpu().tolist()
    val_loss = sum(loss_sum) / max(1.0, sum(count))
    names = [f"L{i}" for i in range(n_levels)] + ["special"]
    levels = {name: s / c for name, s, c in zip(names, loss_sum, count) if c > 0}
    return {"val_loss": val_loss, "val_bps": val_loss * float(meta["tokens_per_second"]) / math.log(2),
            "val_loss_levels": levels}


def check_config(cfg: TrainConfig, world_size: int) -> None:
    positive = ["batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval", "n_layer", "n_head", "n_embd"]
    for key in positive:
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)}: must be at least 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key}={getattr(cfg, key)}: must not be negative")
    if not cfg.learning_rate > 0:
        raise UserError(f"learning_rate={cfg.learning_rate}: must be positive")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"dropout={cfg.dropout}: must be in [0, 1)")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd}: must be divisible by n_head={cfg.n_head}")
    if cfg.init_from not in ("scratch", "resume"):
        raise UserError(f"init_from={cfg.init_from}: expected 'scratch' or 'resume'")
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: must be divisible by the "
                        f"number of processes ({world_size}); it counts the micro-steps of the whole job")


ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


def check_resume(ckpt: dict, ckpt_path: str, meta: dict, cfg: TrainConfig) -> None:
    """The checkpoint must fit the data (same tokens) and the config (same architecture)."""
    missing = [k for k in ("optimizer", "iter_num", "best_val_loss", "meta", "rng", "scaler") if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {ckpt_path}: has no {', '.join(missing)}; only train.py's ckpt.pt can be resumed")
    for key in ("layout", "vq_strides", "codebook_size", "vocab_size"):
        if ckpt["meta"].get(key) != meta.get(key):
            raise UserError(f"checkpoint {ckpt_path}: was trained on {key}={ckpt['meta'].get(key)} but {cfg.data_dir} "
                            f"has {key}={meta.get(key)}; use the dataset it was trained on or a new out_dir")
    for key in ARCH_KEYS:
        if ckpt["model_args"][key] != getattr(cfg, key):
            raise UserError(f"checkpoint {ckpt_path}: has {key}={ckpt['model_args'][key]} but the config says "
                            f"{getattr(cfg, key)}; pass --{key}={ckpt['model_args'][key]} to resume it")


def trim_log(path: str, iter_num: int) -> None:
    """On resume, drop log lines written after the checkpoint, so the log reads as one uninterrupted run."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if r["iter"] < iter_num or (r["iter"] == iter_num and "val_loss" in r)]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep)), mode="w")


# -----------------------------------------------------------------------------

def main() -> None:
    cfg = parse_config(TrainConfig, sys.argv[1:], __doc__)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    master = rank == 0
    check_config(cfg, world_size)
    device = pick_device(cfg.device)
    if ddp and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dtype = pick_dtype(cfg.dtype, device)
    meta, streams = load_dataset(cfg.data_dir)
    train_data, val_data = streams["train"], streams["val"]
    if len(train_data) < cfg.block_size + 1:
        raise UserError(f"block_size={cfg.block_size}: longer than the train split of {cfg.data_dir} "
                        f"({len(train_data)} tokens, a window needs block_size + 1); use a smaller --block_size")
    val_block = min(cfg.block_size, len(val_data) - 1)  # a val split shorter than a window is read whole

    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    model_args = dict(block_size=cfg.block_size, vocab_size=int(meta["vocab_size"]), n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if cfg.init_from == "resume":
        if not os.path.isfile(ckpt_path):
            raise UserError(f"init_from=resume: no checkpoint {ckpt_path}; train from scratch first or fix --out_dir")
        ckpt = load_checkpoint(ckpt_path)
        check_resume(ckpt, ckpt_path, meta, cfg)
        iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])

    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        if master:
            print("config:", json.dumps(dataclasses.asdict(cfg)), flush=True)
            print(f"device {device} | dtype {dtype} | processes {world_size} | train {len(train_data):,} tokens | "
                  f"val {len(val_data):,} tokens | {meta['tokens_per_second']:.2f} tokens per second of audio", flush=True)
            os.makedirs(cfg.out_dir, exist_ok=True)
            write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
            if cfg.init_from == "resume":
                trim_log(log_path, iter_num)
            elif os.path.exists(log_path):
                os.remove(log_path)
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: float32 range, much faster on Ampere+
            torch.backends.cudnn.allow_tf32 = True
        train(cfg, meta, train_data, val_data, val_block, model_args, ckpt, iter_num, best_val_loss,
              device, dtype, ddp, rank, world_size, ckpt_path, best_path, log_path)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def train(cfg: TrainConfig, meta: dict, train_data: TokenStream, val_data: TokenStream, val_block: int,
          model_args: dict, ckpt: dict | None, iter_num: int, best_val_loss: float, device: str, dtype: str,
          ddp: bool, rank: int, world_size: int, ckpt_path: str, best_path: str, log_path: str) -> None:
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = GPT(GPTConfig(**model_args))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    raw_model = model.to(device)  # the uncompiled, unwrapped model: its state_dict goes into checkpoints
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device.split(":")[0])
    # fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():  # empty when the checkpoint's run did not scale (bf16)
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.startswith("cuda") and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    ckpt = None  # free the memory
    eval_model = torch.compile(raw_model) if cfg.compile and device.startswith("cuda") else raw_model
    model = eval_model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(eval_model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    if master and cfg.wandb_log:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg))

    micro_steps = cfg.gradient_accumulation_steps // world_size  # this rank's share of every iteration
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    n_train_starts = len(train_data) - cfg.block_size
    val_starts = eval_starts(cfg.seed, cfg.eval_iters * cfg.batch_size, len(val_data) - val_block) \
        if val_block > 0 else np.zeros(0, dtype=np.int64)
    my_val_starts = val_starts[rank::world_size]
    peak = peak_flops_for(device, dtype, cfg.peak_flops) if master else 0.0
    if master:
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {tokens_per_iter:,} tokens per iteration | "
              f"{micro_steps} micro-steps of {cfg.batch_size} x {cfg.block_size} per process | "
              f"peak {peak / 1e12:.3g} TFLOP/s for MFU", flush=True)
        if val_block <= 0:
            print(f"note: {cfg.data_dir} has no val tokens, so there is no eval and no best.pt", flush=True)

    def log(row: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if cfg.wandb_log:
            import wandb
            wandb.log(row, step=row["iter"])

    pending: list[tuple[int, torch.Tensor]] = []  # (iteration, this rank's loss sum) not yet read back

    def flush_losses() -> dict[int, float]:
        """One all-reduce and one device sync for every iteration since the last call; stops on NaN/inf."""
        if not pending:
            return {}
        its, sums = [it for it, _ in pending], torch.stack([s for _, s in pending]).float()
        pending.clear()
        if ddp:
            torch.distributed.all_reduce(sums)
        losses = dict(zip(its, (sums / cfg.gradient_accumulation_steps).tolist()))  # mean over all micro-steps
        for it, loss in losses.items():
            if not math.isfinite(loss):
                kept = f"{ckpt_path} (the last good checkpoint) was kept" if os.path.exists(ckpt_path) \
                    else "no checkpoint was written"
                raise UserError(f"training loss is {loss} at iteration {it} (lr {get_lr(it, cfg):.3g}): training "
                                f"stopped, {kept}; lower --learning_rate or raise --warmup_iters")
        return losses

    resumed_at = iter_num if cfg.init_from == "resume" else -1
    t0, iters_timed = time.perf_counter(), 0
    while True:
        # eval + checkpoint (skipped right after a resume: that checkpoint was written after this very eval)
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != resumed_at:
            flush_losses()  # never checkpoint weights that came from a NaN step
            row = {"iter": iter_num}
            if len(val_starts):
                row.update(evaluate(eval_model, val_data, my_val_starts, val_block, cfg, meta, device, dtype, ddp))
            if master:
                if "val_loss" in row:
                    levels = " ".join(f"{k} {v:.3f}" for k, v in row["val_loss_levels"].items())
                    print(f"iter {iter_num} | val loss {row['val_loss']:.4f} | {row['val_bps']:.0f} bits/s | "
                          f"per level {levels}", flush=True)
                    log(row)
                improved = row.get("val_loss", float("inf")) < best_val_loss
                best_val_loss = min(best_val_loss, row.get("val_loss", float("inf")))
                ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "model_args": model_args, "iter_num": iter_num,
                        "best_val_loss": best_val_loss, "config": dataclasses.asdict(cfg), "meta": meta,
                        "rng": {"torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if device.startswith("cuda") else []},
                        # the data order is a function of (seed, iteration): iter_num is the data position
                        "data": {"seed": cfg.seed, "next_iter": iter_num}}
                save_checkpoint(ckpt_path, ckpt)
                if improved:
                    save_checkpoint(best_path, ckpt)
                ckpt = None
            t0, iters_timed = time.perf_counter(), 0  # eval time is not training time
        if iter_num >= cfg.max_iters:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = train_starts(cfg.seed, iter_num, cfg.gradient_accumulation_steps * cfg.batch_size, n_train_starts)
        starts = starts.reshape(cfg.gradient_accumulation_steps, cfg.batch_size)[rank * micro_steps:(rank + 1) * micro_steps]
        loss_sum = None
        for micro_step in range(micro_steps):
            # dropout masks from (seed, iteration, micro-step of the whole job) alone: a resumed run, and a run on
            # another number of processes, draw the same masks
            job_step = rank * micro_steps + micro_step
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, iter_num, job_step]).generate_state(1)[0]))
            x, y = to_device(train_data.read(starts[micro_step], cfg.block_size + 1), device, model_args["vocab_size"], "train")
            # gradients are all-reduced only after the last micro-step of the iteration
            sync = model.no_sync() if ddp and micro_step < micro_steps - 1 else nullcontext()
            with sync:
                with autocast(device, dtype):
                    _, loss = model(x, y)
                # each micro-step is 1/micro_steps of this rank's mean; DDP then averages the ranks, which gives
                # the mean over all gradient_accumulation_steps micro-steps of the job, as on one process
                scaler.scale(loss / micro_steps).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        pending.append((iter_num, loss_sum))
        iters_timed += 1

        if iter_num % cfg.log_interval == 0:
            loss = flush_losses()[iter_num]  # the read-back also waits for the device, so the timing is true
            dt = (time.perf_counter() - t0) / iters_timed
            tok_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tok_s / world_size, peak) if peak else 0.0
            if master:
                print(f"iter {iter_num} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms | "
                      f"{tok_s / 1e3:.1f}k tok/s | mfu {mfu * 100:.1f}%", flush=True)
                log({"iter": iter_num, "loss": loss, "lr": lr, "ms": dt * 1000, "tok_s": tok_s, "mfu": mfu})
            t0, iters_timed = time.perf_counter(), 0
        iter_num += 1
    if master:
        print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}, checkpoints in {cfg.out_dir}", flush=True)


if __name__ == "__main__":
    run_main(main)
