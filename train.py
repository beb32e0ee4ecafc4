"""Train a GPT-2 on SNAC audio tokens: one GPU, CPU, Apple MPS, or many GPUs under torchrun.

    python train.py configs/sherlock.py                                   # one GPU (or CPU / MPS)
    python train.py configs/sherlock.py --batch_size=4 --gradient_accumulation_steps=16   # a 16 GB card
    python train.py configs/sherlock.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=4 train.py configs/sherlock.py # 4 GPUs, same model as 1 GPU
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_xl.py  # 1.5B, sharded (FSDP2), out/xl/ckpt/
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

from checkpoints import check_resume
from common import (Dist, UserError, autocast, format_bytes, format_duration, hold_out_dir_lock, move_aside,
                    peak_flops, pick_device, pick_dtype, remove_stale_temp_files, run_main, user_errors, write_failed,
                    write_json)
from config import check_ranges, parse_config
from distributed import (check_fits, device_memory, format_plan, gathered_model, recover, shard_model)
from model import GELU_FORMS, GPT, GPTConfig
from hf import pretrained
from dataset import eval_line, eval_starts, evaluate, get_batch, load_dataset, text_bytes_table, train_starts
from samples import MAX_EVAL_SAMPLE_SECONDS, MAX_EVAL_SAMPLES, EvalSamples
from evalset import spoken_rows
from runstate import find_resume, restore_state, save_state, trim_log


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # ckpt.pt (latest), best.pt (lowest val loss), log.jsonl, config.json
    data_dir: str = "data/sherlock"  # written by prepare_audio.py: train_*.bin, val_*.bin, meta.json
    init_from: str = "scratch"  # scratch, resume, or weights: gpt2[-medium|-large|-xl], a Hub id, a .pt or a folder
    overwrite: bool = False  # allow a run from scratch to replace the checkpoints already in out_dir
    eval_interval: int = 250  # evaluate on val and write checkpoints every this many iterations (and at the end)
    eval_iters: int = 20  # val windows = eval_iters * batch_size, the same fixed windows at every eval
    log_interval: int = 10  # print and log the training loss every this many iterations
    eval_samples: int = 2  # audio samples written to out_dir/samples/ at every eval (then report.html); 0 = off
    eval_sample_seconds: float = 5.0  # the length of each eval sample
    codec: str = ""  # decodes the eval samples: Hub id or local folder; "" = the one in the dataset's meta.json
    eval_asr: str = ""  # an ASR model (Hub id or folder, e.g. openai/whisper-large-v3): log the WER of spoken samples
    eval_sv: str = ""  # with eval_asr: a speaker-verification model for the SIM of rows with a reference voice
    eval_list: str = ""  # with eval_asr: the rows to speak (as eval_tts.py's --list); "" = built-in sentences
    wandb_log: bool = False  # also log to Weights & Biases (pip install wandb)
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
    gelu: str = "exact"  # the MLP's GELU: exact, or tanh (GPT-2's); init_from of weights sets it and the above
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
    fsdp: bool = False  # shard weights, gradients and AdamW's state across the ranks (FSDP2); ckpt/ and best/ folders
    activation_checkpointing: bool = False  # recompute each Block's activations in backward: less memory, ~1/3 slower


def check_config(cfg: TrainConfig, world_size: int) -> None:
    with user_errors():
        check_ranges(cfg, ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                           "log_interval", "n_layer", "n_head", "n_embd"),
                     ("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                      "peak_flops"),
                     (("learning_rate", cfg.learning_rate > 0, "be positive"),
                      ("dropout", 0 <= cfg.dropout < 1, "be in [0, 1)"),
                      ("beta1", 0 <= cfg.beta1 < 1, "be in [0, 1) (AdamW's decay rates)"),
                      ("beta2", 0 <= cfg.beta2 < 1, "be in [0, 1) (AdamW's decay rates)"),
                      ("min_lr", cfg.min_lr <= cfg.learning_rate, f"be at most learning_rate={cfg.learning_rate} "
                       "(the rate decays from learning_rate down to min_lr)"),
                      ("seed", 0 <= cfg.seed < 2 ** 32, "be in [0, 2**32)")))
    if cfg.gelu not in GELU_FORMS:
        raise UserError(f"gelu={cfg.gelu}: must be one of {', '.join(GELU_FORMS)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd}: must be divisible by n_head={cfg.n_head}")
    if not cfg.init_from:
        raise UserError("init_from is empty: expected scratch, resume, or a .pt checkpoint, export.py folder or Hub id")
    if not 0 <= cfg.eval_samples <= MAX_EVAL_SAMPLES or not 0 < cfg.eval_sample_seconds <= MAX_EVAL_SAMPLE_SECONDS:
        raise UserError(f"eval_samples={cfg.eval_samples}, eval_sample_seconds={cfg.eval_sample_seconds}: expected "
                        f"0 (off) to {MAX_EVAL_SAMPLES} samples of more than 0 and at most {MAX_EVAL_SAMPLE_SECONDS} "
                        "seconds (generate.py makes more and longer ones)")
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: must be divisible by the "
                        f"number of processes ({world_size}); it counts the micro-steps of the whole job")
    if not cfg.out_dir:
        raise UserError("out_dir is empty: pass --out_dir=<folder for checkpoints and logs>")
    if cfg.fsdp and cfg.dtype == "float16":
        raise UserError(f"fsdp=True with dtype=float16: {FSDP_FLOAT16}")
    if cfg.fsdp and cfg.device.startswith("mps"):
        raise UserError(f"fsdp=True with device={cfg.device}: FSDP runs on CUDA (nccl) or the CPU (gloo); use "
                        "--fsdp=False on mps")


FSDP_FLOAT16 = ("float16 needs loss scaling, which is not sharded here; use --dtype=bfloat16 (Ampere or newer) or "
                "float32, or --fsdp=False")


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def load_pretrained(cfg: TrainConfig, meta: dict) -> tuple[TrainConfig, dict]:
    """init_from=<weights>: its weights, and cfg with its architecture (dropout stays the config's). Only the
    weights: the optimizer, iteration count and schedule start fresh (hf.pretrained)."""
    try:
        arch, state, grown = pretrained(cfg.init_from, meta, cfg.block_size, cfg.seed, cfg.data_dir)
    except ValueError as e:
        raise UserError(f"init_from={cfg.init_from}: {e}") from None
    if grown:  # the data's layout adds special tokens (chat roles): new rows for them
        print(f"init_from={cfg.init_from}: {grown} new token rows for the data's {meta['layout']} layout", flush=True)
    return dataclasses.replace(cfg, **arch), state


# a run's own files in out_dir (ckpt/ and best/: --fsdp's folders)
RUN_FILES = ("ckpt.pt", "best.pt", "ckpt", "best", "log.jsonl", "config.json", "report.html", "samples")


def main() -> None:
    with user_errors():
        cfg = parse_config(TrainConfig, sys.argv[1:], __doc__)
    dist = Dist.from_env()
    master = dist.master
    check_config(cfg, dist.world_size)
    if master:  # before out_dir is looked at: a second job there refuses, naming this one
        hold_out_dir_lock(cfg.out_dir)
    if cfg.wandb_log:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True: wandb is not installed; `pip install wandb` or drop --wandb_log") from None
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.fsdp and (dtype == "float16" or device_type == "mps"):  # what auto chose (explicit values: check_config)
        check_config(dataclasses.replace(cfg, dtype=dtype, device=device_type), dist.world_size)

    # data
    with user_errors():
        meta, streams = load_dataset(cfg.data_dir)
    train_data, val_data = streams["train"], streams["val"]
    with user_errors():  # eval_asr's rows to speak (None: the built-in sentences), checked before training starts
        spoken, bad_rows = spoken_rows(cfg.eval_asr, cfg.eval_list, meta, cfg.data_dir)
    for line in bad_rows:
        print(f"warning: {line}; skipped", file=sys.stderr, flush=True)
    init_weights = None
    if cfg.init_from not in ("scratch", "resume"):  # fine-tune: the architecture comes with the weights
        cfg, init_weights = load_pretrained(cfg, meta)
    if len(train_data) < cfg.block_size + 1:
        raise UserError(f"block_size={cfg.block_size}: longer than the train split of {cfg.data_dir} "
                        f"({len(train_data)} tokens, a window needs block_size + 1); use a smaller --block_size")
    val_block = min(cfg.block_size, len(val_data) - 1)  # a val split shorter than a window is read whole
    val_starts = eval_starts(cfg.seed, cfg.eval_iters * cfg.batch_size, len(val_data) - val_block) \
        if val_block > 0 else np.zeros(0, dtype=np.int64)
    vocab_size = int(meta["vocab_size"])

    # the checkpoint to resume, checked before anything is written
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                             gelu=cfg.gelu)
    # --fsdp writes folders of shards (ckpt/, best/), a run without it files (ckpt.pt, best.pt)
    ckpt_path, best_path = (os.path.join(cfg.out_dir, name + ("" if cfg.fsdp else ".pt")) for name in ("ckpt", "best"))
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master:  # before any rank looks: finish or undo a sharded save that was killed
        for note in recover(os.path.join(cfg.out_dir, "ckpt")) + recover(os.path.join(cfg.out_dir, "best")):
            print(f"note: {note}", flush=True)
    ckpt, resume_shards = None, ""
    if cfg.init_from == "resume":
        with user_errors():
            ckpt, resume_shards = find_resume(cfg.out_dir, cfg.fsdp)
            check_resume(ckpt, ckpt_path, meta, dataclasses.asdict(model_config), cfg.data_dir)
    elif not cfg.overwrite and any(os.path.exists(os.path.join(cfg.out_dir, p)) for p in RUN_FILES[:4]):
        raise UserError(f"out_dir {cfg.out_dir}: already holds a checkpoint; continue it with --init_from=resume, "
                        "train into a new --out_dir, or pass --overwrite=True to replace it")

    device = dist.init(device, group=cfg.fsdp)  # torchrun: join the group; on CUDA each rank takes its local GPU
    with user_errors():  # before anything is built: the plan, or a refusal naming the options that would fit
        plan = check_fits(model_config, cfg.batch_size, cfg.gradient_accumulation_steps, dist.world_size, cfg.fsdp,
                          cfg.activation_checkpointing, dtype, budget := device_memory(
                              device, int(os.environ.get("LOCAL_WORLD_SIZE", 1))), device)
    try:  # for bits per byte of text; training and the other figures need no text encoding
        text_bytes = text_bytes_table(meta, device) if len(val_starts) else None
    except ValueError as e:
        text_bytes = None
        if master:
            print(f"note: eval's bits per byte of text are off: {e}", flush=True)
    if master:
        print("config:", json.dumps(dataclasses.asdict(cfg)), flush=True)
        print(f"device {device} | dtype {dtype} | processes {dist.world_size} | train {len(train_data):,} tokens | "
              f"val {len(val_data):,} tokens | {meta['tokens_per_second']:.2f} tokens per second of audio", flush=True)
        print(format_plan(plan, budget, device), flush=True)
        os.makedirs(cfg.out_dir, exist_ok=True)
        for name in remove_stale_temp_files(cfg.out_dir, ("ckpt.pt", "best.pt", "log.jsonl", "config.json")):
            print(f"note: removed {name}, a partial file left by a run that was killed while writing it", flush=True)
        aside = None if ckpt else move_aside(cfg.out_dir, RUN_FILES)
        if aside:
            print(f"note: moved the earlier run's files in {cfg.out_dir} (checkpoints, log, samples, report) to "
                  f"{aside}", flush=True)
        write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
        if ckpt:
            trim_log(log_path, int(ckpt["iter_num"]))
        if cfg.wandb_log:
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg))
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: float32 range, much faster on Ampere+
        torch.backends.cudnn.allow_tf32 = True

    # model and optimizer, from scratch or restored
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = GPT(model_config)  # uncompiled, unwrapped: its state_dict is what checkpoints hold
    if init_weights:
        raw_model.load_state_dict(init_weights)
    raw_model.checkpoint_blocks = cfg.activation_checkpointing
    if cfg.fsdp:  # built on the CPU, whole: each rank moves only its shards to the device
        shard_model(raw_model, None if dtype == "float32" else getattr(torch, dtype),
                    compile_blocks=cfg.compile and device_type == "cuda")
    else:
        raw_model.to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device_type)
    # fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    iter_num, best_val_loss = restore_state(ckpt, raw_model, optimizer, scaler, resume_shards) if ckpt \
        else (0, float("inf"))
    resumed_at = iter_num if ckpt else -1
    ckpt = None  # free the memory
    model = torch.compile(raw_model) if cfg.compile and device_type == "cuda" and not cfg.fsdp else raw_model
    if dist.ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dist.local_rank] if device_type == "cuda" else None)

    micro_steps = cfg.gradient_accumulation_steps // dist.world_size  # this rank's share of every iteration
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    n_train_starts = len(train_data) - cfg.block_size
    peak = peak_flops(device, dtype, cfg.peak_flops) if master else 0.0
    if master:
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {tokens_per_iter:,} tokens per iteration | "
              f"{micro_steps} micro-steps of {cfg.batch_size} x {cfg.block_size} per process | "
              f"peak {peak / 1e12:.3g} TFLOP/s for MFU", flush=True)
        if cfg.compile and device_type != "cuda":
            print(f"note: compile is used on CUDA only (on {device_type} it is slow to start and gains little)",
                  flush=True)
        if not len(val_starts):
            print(f"note: {cfg.data_dir} has no val tokens, so there is no eval and no best.pt", flush=True)

    def log(row: dict) -> None:
        try:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: the error names the file
            raise write_failed(log_path, e) from None
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
        if dist.ddp:
            torch.distributed.all_reduce(sums)
        losses = dict(zip(its, (sums / cfg.gradient_accumulation_steps).tolist()))  # mean over all micro-steps
        for it, loss in losses.items():
            if not math.isfinite(loss):
                kept = f"{ckpt_path} (the last good checkpoint) was kept" if os.path.exists(ckpt_path) \
                    else "no checkpoint was written"
                raise UserError(f"training loss is {loss} at iteration {it} (lr {get_lr(it, cfg):.3g}): training "
                                f"stopped, {kept}; lower --learning_rate or raise --warmup_iters")
        return losses

    samples = EvalSamples(cfg.out_dir, meta, cfg.eval_samples if master else 0, cfg.eval_sample_seconds, device,
                          cfg.seed, cfg.codec, cfg.eval_asr, cfg.eval_sv, spoken)
    t0, iters_timed = time.perf_counter(), 0
    while True:
        # eval + checkpoint (skipped right after a resume: that checkpoint was written after this very eval)
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != resumed_at:
            flush_losses()  # never checkpoint weights that came from a NaN step
            row = {"iter": iter_num}
            if len(val_starts):
                # FSDP gathers each unit's weights in every forward, so every rank runs as many as the busiest
                steps = -(-len(val_starts[::dist.world_size]) // cfg.batch_size) if cfg.fsdp else 0
                with user_errors():  # a token id the model does not know: the shards do not match meta.json
                    row.update(evaluate(model, val_data, val_starts[dist.rank::dist.world_size], val_block,
                                        cfg.batch_size, meta, device, dtype, dist.ddp, text_bytes, steps))
            improved = row.get("val_loss", float("inf")) < best_val_loss  # the same on every rank (all-reduced)
            best_val_loss = min(best_val_loss, row.get("val_loss", float("inf")))
            # with FSDP every rank gathers the weights and rank 0 samples from a whole copy
            sample_model = gathered_model(raw_model, device) if cfg.fsdp and cfg.eval_samples else raw_model
            if master:
                row.update(samples(sample_model, iter_num, last=iter_num == cfg.max_iters))  # {"sample_s": ...}
                if "val_loss" in row:
                    print(eval_line(row), flush=True)
                    log(row)
            sample_model = None
            if master or cfg.fsdp:  # with FSDP every rank writes its shards
                save_state([ckpt_path, best_path] if improved else [ckpt_path], raw_model, optimizer, scaler, cfg,
                           meta, iter_num, best_val_loss)
            if master:
                samples.report()  # out_dir/report.html, in the same time budget as the samples
            t0, iters_timed = time.perf_counter(), 0  # eval time is not training time
        if iter_num >= cfg.max_iters:
            break

        # one iteration: this rank's micro-steps of the job's windows, then one optimizer step
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = train_starts(cfg.seed, iter_num, cfg.gradient_accumulation_steps * cfg.batch_size, n_train_starts)
        starts = starts.reshape(cfg.gradient_accumulation_steps, cfg.batch_size)  # (micro-steps of the job, B)
        loss_sum = None
        for micro_step in range(micro_steps):
            job_step = dist.rank * micro_steps + micro_step
            # dropout masks from (seed, iteration, micro-step of the whole job) alone: a resumed run, and a run on
            # another number of processes, draw the same masks
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, iter_num, job_step]).generate_state(1)[0]))
            with user_errors():  # a token id the model does not know: the shards do not match meta.json
                x, y = get_batch(train_data, starts[job_step], cfg.block_size, device, model_config.vocab_size)
            # gradients are all-reduced only after the last micro-step of the iteration
            # (FSDP reduce-scatters every micro-step: holding whole gradients until the last would undo the sharding)
            sync = model.no_sync() if dist.ddp and not cfg.fsdp and micro_step < micro_steps - 1 else nullcontext()
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
            mfu = raw_model.estimate_mfu(tok_s / dist.world_size, peak) if peak else 0.0
            # over 100% means the peak is wrong (a CPU's, measured once at start on a busy machine), not that the
            # model beats the hardware: no figure then, in the line or the log
            mfu = mfu if mfu <= 1 else None
            if master:
                print(f"iter {iter_num} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms | "
                      f"{tok_s / 1e3:.1f}k tok/s | mfu {'?' if mfu is None else f'{mfu * 100:.1f}%'} | "
                      f"eta {format_duration((cfg.max_iters - iter_num - 1) * dt)}", flush=True)
                log({"iter": iter_num, "loss": loss, "lr": lr, "ms": dt * 1000, "tok_s": tok_s, "mfu": mfu})
            t0, iters_timed = time.perf_counter(), 0
        iter_num += 1
    if master:
        best = f"best val loss {best_val_loss:.4f}" if math.isfinite(best_val_loss) else "no eval (no val split)"
        mem = f", peak memory {format_bytes(torch.cuda.max_memory_allocated(device))} (planned " \
            f"{format_bytes(plan['total'])})" if device_type == "cuda" else ""
        print(f"done: {iter_num} iterations, {best}, checkpoints in {cfg.out_dir}{mem}", flush=True)
    # leave the group together, once rank 0 has written its last checkpoint and report: a rank that dies on its way
    # out (seen in CI: gloo aborting rank 1, cause unknown) has torchrun stop the others, and rank 0 not mid-write
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    run_main(main, on_full_disk="every checkpoint written before it is intact (a checkpoint is written whole or not "
                                "at all): free some space, then continue with --init_from=resume")
