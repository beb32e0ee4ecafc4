"""Speed of gpt2o's parts, each row beside a baseline measured in the same run on the same machine.

    python bench.py                          # list the parts
    python bench.py tokenizer generate       # run those parts; `python bench.py all` runs every one
    python bench.py all --quick              # every part at its smallest size (a few minutes on 2 CPU cores)

A row reads: what is measured, our figure, the baseline's, and the ratio, turned so that above 1x we do better
(ours / baseline for a rate, baseline / ours for a time or a size). The baselines mean something outside this code:
the seed's per-token loops, nanoGPT's training loop and its cache-free generate, the bare SNAC encode, the
weight-streaming bound (bytes of weights / the memory bandwidth measured here), real time, PyTorch's default
attention dispatch. Shared machines are noisy: compare the ratios of one run, not figures across runs. Weights are
random (speed does not depend on them). Parts that need CUDA (graphs, the codes hand-off) say so in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import fixtures
import sampling
from checkpoints import save_checkpoint
from codec import load_codec
from common import measure_matmul_flops
from config import read_config_file
from tokenizer import Layout

ROOT = os.path.dirname(os.path.abspath(__file__))
LAYOUT = Layout((4, 2, 1), 4096)  # SNAC 24 kHz, audio only
FS = LAYOUT.frame_size
REAL_TIME = 24000 / 2048 * FS  # tokens per second of audio: 82.03
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA and torch.cuda.is_bf16_supported() else torch.float32  # what generate.py picks
sync = torch.cuda.synchronize if CUDA else (lambda: None)  # wait for queued GPU work


def timeit(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` calls after one warm-up call, queued GPU work included."""
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def row(what: str, ours: float, base: float, unit: str, higher_is_better: bool = True) -> None:
    ratio = ours / base if higher_is_better else base / ours
    print(f"{what:<66} {ours:>10.4g} {unit:<8} baseline {base:>10.4g}  {ratio:>7.2f}x", flush=True)


def header() -> str:
    """The commit and the machine: GPU name, or CPU model and cores; torch's version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    if CUDA:
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        where = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return f"gpt2o bench | commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty} | {where}"


def model_args(name: str) -> dict:
    """A config file's model size: n_layer, n_head, n_embd, block_size."""
    cfg = read_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    return {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}


# --- tokenizer ---------------------------------------------------------------
def blog_flatten(codes: list, separator: int = 4097) -> list[list[int]]:
    """The seed's flattening (the blog's): per-token .item() loops and a separator before every frame."""
    flattened = []
    for b in range(codes[0].size(0)):
        out = []
        for i in range(codes[0].size(1)):
            out += [separator, codes[0][b][i].item()]
            for j in range(2):
                out.append(codes[1][b][j + i * 2].item())
                for k in range(2):
                    out.append(codes[2][b][k + j * 2 + i * 4].item())
        flattened.append(out)
    return flattened


def blog_unflatten(tokens: list[int], separator: int = 4097) -> list:
    """The seed's unflattening: a per-token scan that rebuilds the code tensors after every frame."""
    tokens = tokens[tokens.index(separator):]
    l0, l1, l2, codes = [], [], [], []
    for i in range(0, len(tokens), 8):
        l0.append(tokens[i + 1])
        l1 += [tokens[i + 2], tokens[i + 5]]
        l2 += [tokens[i + 3], tokens[i + 4], tokens[i + 6], tokens[i + 7]]
        codes = [torch.tensor(l0).unsqueeze(0), torch.tensor(l1).unsqueeze(0), torch.tensor(l2).unsqueeze(0)]
    return codes


def bench_tokenizer(quick: bool) -> None:
    """The seed's per-token loops vs Layout's vectorised codes -> tokens -> codes, on torch tensors and numpy."""
    seconds = 10 if quick else 60
    n_frames = -(-seconds * 24000 // 2048)
    n_codes = n_frames * FS
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 4096, (1, n_frames * k), generator=gen) for k in LAYOUT.codes_per_frame]
    for back in (blog_unflatten(blog_flatten(codes)[0]), LAYOUT.tokens_to_codes(LAYOUT.codes_to_tokens(codes))):
        assert all(torch.equal(a, b) for a, b in zip(back, codes)), "round trip is wrong"
    base = n_codes / timeit(lambda: blog_unflatten(blog_flatten(codes)[0]), repeat=2)
    for kind, c in (("torch", codes), ("numpy", [c.numpy() for c in codes])):
        ours = n_codes / timeit(lambda: LAYOUT.tokens_to_codes(LAYOUT.codes_to_tokens(c)), repeat=20)
        row(f"codes <-> tokens, {seconds} s ({n_codes} codes), {kind}, vs the seed's loops", ours, base, "codes/s")


# --- prepare ------------------------------------------------------------------
def bench_prepare(quick: bool) -> None:
    """prepare_audio.py end to end (its own process: start-up, reading, resampling, workers, shards) vs the bare
    batched SNAC encode of the same audio, already 24 kHz mono on the device. Two kinds of file, neither at the
    codec rate, each longer than a chunk (overlaps are paid); on CUDA 8 hours, so that start-up weighs little."""
    import soundfile as sf
    files = {"a_16k_mono.flac": (16000, 1), "b_44k_stereo.wav": (44100, 2)}
    lengths, copies = ((600.0, 600.0), 24) if CUDA else ((12.0, 15.0), 1) if quick else ((80.0, 100.0), 1)
    chunk, batch = 5.0 if quick and not CUDA else 60.0, 4 if CUDA else 1  # prepare_audio.py's chunks per call
    with tempfile.TemporaryDirectory() as tmp:
        codec_dir = fixtures.save_random_snac(f"{tmp}/codec", fixtures.SNAC_24KHZ_CONFIG)
        tok = load_codec(codec_dir, DEVICE)
        step, by_length = round(chunk * tok.sample_rate), {}  # the bare codec's input: chunks of equal length
        os.makedirs(f"{tmp}/audio")
        for i, ((name, (rate, channels)), seconds) in enumerate(zip(files.items(), lengths)):
            audio = fixtures.synth_audio(seconds, rate, channels, seed=i)
            sf.write(f"{tmp}/audio/000_{name}", audio, rate)
            for c in range(1, copies):
                shutil.copy(f"{tmp}/audio/000_{name}", f"{tmp}/audio/{c:03d}_{name}")
            mono = tok.to_mono(audio, rate).to(DEVICE)
            for j in [j for _ in range(copies) for j in range(0, len(mono), step)]:
                by_length.setdefault(len(mono[j:j + step]), []).append(mono[j:j + step])
        calls = [same[j:j + batch] for same in by_length.values() for j in range(0, len(same), batch)]

        @torch.inference_mode()
        def bare(limit: int | None = None) -> None:
            for chunks in calls[:limit]:
                tok.codec.encode(torch.stack(chunks)[:, None])  # (B, 1, samples)
            sync()
        if CUDA:
            bare(limit=2)  # CUDA context, cuDNN's plans
        t0 = time.perf_counter()
        bare()
        base = time.perf_counter() - t0
        calls.clear()  # the device's memory is prepare_audio.py's now
        by_length.clear()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, f"{ROOT}/prepare_audio.py", f"--codec={codec_dir}", f"--device={DEVICE}",
                            f"--dataset={tmp}/audio", f"--out_dir={tmp}/out", f"--chunk_seconds={chunk}",
                            f"--batch_seconds={batch * chunk}", "--text_encoding=none"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        ours = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"error: prepare_audio.py failed: {r.stderr[-2000:]}")
    row(f"prepare_audio.py, {copies * sum(lengths) / 60:.3g} min of audio, wall vs the bare batched encode", ours,
        base, "s", False)
    account = next((line for line in r.stdout.splitlines() if line.startswith("time: ")), "(none)")
    print(f"  prepare_audio.py's own account: {account}", flush=True)


def bench_handoff(quick: bool) -> None:
    """CUDA: a group's codes on the host while the next group encodes: codes_to_host (copies queued behind their own
    codec calls, waited for with an event) vs a plain .cpu(), which also waits for the next group's calls."""
    if not CUDA:
        print("handoff: needs CUDA, skipped", flush=True)
        return
    with tempfile.TemporaryDirectory() as d:
        tok = load_codec(fixtures.save_random_snac(d, fixtures.SNAC_24KHZ_CONFIG), DEVICE)
    group = [tok.to_mono(fixtures.synth_audio(s, 24000, seed=s), 24000) for s in (30, 20)]
    after = [tok.to_mono(fixtures.synth_audio(60.0 if quick else 180.0, 24000, seed=3), 24000)]

    def codes_back(ours: bool) -> float:
        """Seconds from queueing a group's encode until its codes are on the host, the next group queued between."""
        sync()
        t0 = time.perf_counter()
        encoded = tok.encode_many(group, chunk_seconds=10, batch_seconds=20)
        wait = tok.codes_to_host(encoded) if ours else None
        tok.encode_many(after, chunk_seconds=60)
        _ = wait() if ours else [[c.cpu().numpy() for c in codes] for codes in encoded]
        t = time.perf_counter() - t0
        sync()
        return t
    codes_back(True), codes_back(False)  # warm-up
    row("a group's codes on the host, the next one queued: codes_to_host vs .cpu()",
        min(codes_back(True) for _ in range(3)), min(codes_back(False) for _ in range(3)), "s", False)


# --- train --------------------------------------------------------------------
def plain_step(model, optimizer, data: np.ndarray, block: int, batch: int) -> float:
    """One iteration of nanoGPT's train.py loop, reduced to its essentials: a random batch of the memmap, forward
    (bf16 autocast on CUDA), backward, clip, AdamW; its wall time in seconds."""
    sync()
    t0 = time.perf_counter()
    ix = torch.randint(len(data) - block, (batch,))
    x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
    if CUDA:
        x, y = x.pin_memory().to(DEVICE, non_blocking=True), y.pin_memory().to(DEVICE, non_blocking=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - t0


def train_run(tmp: str, name: str, args: list[str], torchrun: int = 0) -> tuple[list[dict], str]:
    """train.py on tmp/data into tmp/<name> (torchrun: that many processes); its log rows and stdout."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    r = subprocess.run(cmd + [f"{ROOT}/train.py", f"--data_dir={tmp}/data", f"--out_dir={tmp}/{name}",
                              f"--device={DEVICE}", f"--compile={CUDA}", "--log_interval=1", "--eval_interval=1000",
                              "--eval_iters=1", "--eval_samples=0", *args],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"} if torchrun
                       else None)
    if r.returncode:
        raise SystemExit(f"error: train.py failed: {r.stderr[-2000:]}")
    with open(f"{tmp}/{name}/log.jsonl") as f:
        return [x for x in map(json.loads, f) if "ms" in x], r.stdout


def bench_train(quick: bool) -> None:
    """train.py's tokens/s and MFU vs a plain nanoGPT-style loop's, same model and data (compile + bf16 on CUDA);
    FSDP vs DDP on 2 gloo ranks (CPU), or GPT-2 XL sharded with activation checkpointing on one GPU (CUDA)."""
    n_layer, n_head, n_embd, block, batch, iters, warm = (
        (12, 12, 768, 1024, 16, 30, 10) if CUDA else (2, 2, 128, 256, 4, 8, 2) if quick else (6, 6, 384, 512, 8, 6, 1))
    with tempfile.TemporaryDirectory() as tmp:
        fixtures.random_dataset(f"{tmp}/data", LAYOUT, [3_000_000], [50_000])
        peak = 0.0 if CUDA else measure_matmul_flops("cpu", n=2048)  # 0: train.py looks up the GPU's data sheet
        size = [f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", f"--block_size={block}",
                f"--batch_size={batch}", f"--max_iters={iters}", f"--peak_flops={peak}",
                "--gradient_accumulation_steps=1"]
        rows = [x for x in train_run(tmp, "out", size)[0] if x["iter"] >= warm]
        ours = batch * block / (np.median([x["ms"] for x in rows]) / 1000)
        model = fixtures.tiny_gpt(LAYOUT.vocab_size, block, 0, n_embd, n_layer, n_head).to(DEVICE).train()
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), DEVICE)
        step = torch.compile(model) if CUDA else model
        data = np.memmap(f"{tmp}/data/train_000.bin", dtype=np.uint16, mode="r")
        base = batch * block / np.median([plain_step(step, optimizer, data, block, batch) for _ in range(iters)][warm:])
        row(f"train.py {n_layer}x{n_embd} block {block} batch {batch} vs a plain nanoGPT loop", ours, base, "tok/s")
        mfu = np.median([x["mfu"] for x in rows])
        against = "the data-sheet peak" if CUDA else f"a float32 2048x2048 matmul here, {peak / 1e9:.0f} GFLOP/s"
        print(f"  MFU against {against}: train.py {mfu:.1%}, the plain loop {mfu * base / ours:.1%}", flush=True)
        del model, optimizer, step
        if CUDA:  # the 124M model at T=2048; GPT-2 XL on this one card, sharded (a one-rank group) + checkpointing
            long = [x for x in train_run(tmp, "t2048", size + ["--block_size=2048", f"--batch_size={batch // 2}"])[0]
                    if x["iter"] >= warm]
            print(f"  same at block 2048, batch {batch // 2}: MFU {np.median([x['mfu'] for x in long]):.1%}")
            xl, out = train_run(tmp, "xl", ["--n_layer=48", "--n_head=25", "--n_embd=1600", "--block_size=1024",
                                            "--batch_size=8", "--gradient_accumulation_steps=1",
                                            f"--max_iters={6 if quick else 12}", "--fsdp=True",
                                            "--activation_checkpointing=True"])
            done = out.strip().splitlines()[-1]
            print(f"  GPT-2 XL shape, FSDP + activation checkpointing, 8 x 1024: MFU "
                  f"{np.median([x['mfu'] for x in xl[3:]]):.1%} | {done.split(', ', 2)[-1]}", flush=True)
            return
        # FSDP vs DDP, 2 processes over gloo, the same model and batch (tokens/s of the whole job)
        two = size + ["--gradient_accumulation_steps=2", "--max_iters=" + str(iters)]
        ddp = np.median([x["ms"] for x in train_run(tmp, "ddp", two, torchrun=2)[0][warm:]])
        fsdp = np.median([x["ms"] for x in train_run(tmp, "fsdp", two + ["--fsdp=True"], torchrun=2)[0][warm:]])
        row("train.py on 2 gloo ranks: --fsdp=True vs DDP", 2 * batch * block / fsdp * 1000,
            2 * batch * block / ddp * 1000, "tok/s")


# --- gpt2 ---------------------------------------------------------------------
def train_log(args: list[str]) -> list[dict]:
    """train.py with these flags in a temp out_dir -> its log rows."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, f"{ROOT}/train.py", f"--out_dir={tmp}/out", f"--device={DEVICE}",
                            f"--compile={CUDA}", "--eval_samples=0", "--gradient_accumulation_steps=1", *args],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"error: train.py failed: {r.stderr[-2000:]}")
        with open(f"{tmp}/out/log.jsonl") as f:
            return [json.loads(line) for line in f]


def bench_gpt2(quick: bool) -> None:
    """What uint32 shards (text encodings past 65,535 ids) cost a training step: train.py's batch reads from
    uint32 vs uint16 shards, over the step they feed (end to end the difference drowns in a shared machine's
    noise); then fine-tuning from GPT-2's weights vs from scratch (the same architecture, data and steps; needs
    the Hub and a dataset prepared with GPT-2's BPE)."""
    from dataset import get_batch, load_dataset
    n_layer, n_embd, block, batch = (2, 128, 256, 4) if quick else (12, 768, 1024, 8) if CUDA else (6, 384, 512, 8)
    big = Layout((4, 2, 1), 4096, "cl100k_base", 100277)  # GPT-4's encoding: ids past 65,535, so uint32 shards
    with tempfile.TemporaryDirectory() as tmp:
        reads = {}
        for dtype in ("uint16", "uint32"):
            fixtures.random_dataset(f"{tmp}/{dtype}", LAYOUT, [20_000_000], [1000], dtype=dtype)
            stream = load_dataset(f"{tmp}/{dtype}")[1]["train"]
            starts = [np.random.default_rng(i).integers(0, len(stream) - block, batch) for i in range(20)]
            reads[dtype] = timeit(lambda: [get_batch(stream, s, block, DEVICE, big.vocab_size) for s in starts]) / 20
        model = fixtures.tiny_gpt(big.vocab_size, block, 0, n_embd, n_layer, n_layer).to(DEVICE).train()
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), DEVICE)
        data = np.memmap(f"{tmp}/uint32/train_000.bin", dtype="<u4", mode="r")
        step = min(plain_step(model, optimizer, data, block, batch) for _ in range(3))
    row(f"batch read ({batch} x {block}), uint32 shards vs uint16", reads["uint32"] * 1e3, reads["uint16"] * 1e3,
        "ms", False)
    extra = (reads["uint32"] - reads["uint16"]) / step
    print(f"  a train step of a {n_layer}x{n_embd} GPT with cl100k_base's vocabulary takes {step * 1e3:.0f} ms: "
          f"uint32 shards change its tokens/s by {-extra:+.3%}", flush=True)
    data = os.environ.get("GPT2_BENCH_DATA", "data/ljspeech")
    try:
        from hf import load_model
        load_model("gpt2")
    except ValueError as e:
        print(f"gpt2 vs scratch: needs GPT-2's weights from the Hugging Face Hub ({str(e)[:120]}...)", flush=True)
        return
    if not os.path.isfile(os.path.join(data, "meta.json")):
        print(f"gpt2 vs scratch: needs a dataset prepared with GPT-2's BPE at {data} (configs/gpt2_speech.py says "
              "how; GPT2_BENCH_DATA=<folder> for another)", flush=True)
        return
    n = 20 if quick else 200
    common = [f"--data_dir={data}", "--block_size=1024", "--batch_size=8", f"--max_iters={n}", "--warmup_iters=10",
              "--learning_rate=3e-4", "--min_lr=3e-5", f"--eval_interval={n}", "--eval_iters=10",
              "--log_interval=10", "--dropout=0.0"]
    tuned = [r for r in train_log(common + ["--init_from=gpt2"]) if "val_loss" in r]
    scratch = [r for r in train_log(common + ["--n_layer=12", "--n_head=12", "--n_embd=768", "--bias=True",
                                              "--gelu=tanh"]) if "val_loss" in r]
    row("val loss at iteration 0: GPT-2 + mean-initialised audio rows vs random init", tuned[0]["val_loss"],
        scratch[0]["val_loss"], "nats", False)
    row(f"val loss after {n} iterations (8 x 1024 tokens each): from GPT-2 vs from scratch", tuned[-1]["val_loss"],
        scratch[-1]["val_loss"], "nats", False)
    if "val_text_loss" in tuned[-1] and "val_text_loss" in scratch[-1]:
        row(f"val text loss after {n} iterations: from GPT-2 vs from scratch", tuned[-1]["val_text_loss"],
            scratch[-1]["val_text_loss"], "nats", False)


# --- generate -----------------------------------------------------------------
def random_tokens(n_frames: int, seed: int = 0) -> torch.Tensor:
    """n_frames of valid audio ids, (n_frames * frame_size,)."""
    frames = torch.randint(0, LAYOUT.codebook_size, (n_frames, FS), generator=torch.Generator().manual_seed(seed))
    return (frames + torch.from_numpy(LAYOUT.frame_levels * LAYOUT.codebook_size)).reshape(-1)


def tokens_per_s(model, n_frames: int, b: int = 1, prompt=None, repeat: int = 1, frames=sampling.sample_frames,
                 **kw) -> float:
    """New tokens of all rows per second (the prefill included), the best of `repeat` runs after a warm-up run
    (which captures or compiles); temperature 1, no top-k/top-p."""
    def run() -> None:
        g = torch.Generator(device=model.lm_head.weight.device).manual_seed(0)
        for _ in frames(model, LAYOUT, prompt, n_frames, num_samples=b, generator=g, **kw):
            pass
    return b * n_frames * FS / timeit(run, repeat)


def streaming_bound(model) -> float:
    """Batch 1 reads every weight once per token: tokens/s at the bandwidth of a large matrix-vector product in the
    model's dtype, measured now (a VM's bandwidth drifts between runs and within one)."""
    p = model.lm_head.weight
    w = torch.randn((2**30 if CUDA else 2**27) // (512 * p.element_size()), 512, device=p.device, dtype=p.dtype)
    x = torch.randn(1, 512, device=p.device, dtype=p.dtype)
    n_bytes = sum(q.numel() for q in model.parameters()) - model.transformer.wpe.weight.numel()  # wpe: one row
    return w.numel() / timeit(lambda: F.linear(x, w), repeat=10) / n_bytes


def decode_rows(model, label: str, modes: tuple[str, ...], n_frames: int, repeat: int) -> None:
    """Batch 1 per decode mode vs the weight-streaming bound measured just before it, and vs real time."""
    for decode in modes:
        t0 = time.perf_counter()
        sampling.generate_tokens(model, LAYOUT, None, 2, decode=decode)
        print(f"  {label} decode={decode}: 2 frames, capture or compile included, {time.perf_counter() - t0:.2f} s")
        bound = streaming_bound(model)
        tps = tokens_per_s(model, n_frames, repeat=repeat, decode=decode)
        row(f"{label} B=1 {decode} vs weight-streaming bound", tps, bound, "tokens/s")
        row(f"{label} B=1 {decode} vs real time", tps, REAL_TIME, "tokens/s")


def bench_generate(quick: bool) -> None:
    """Sampling: the KV cache vs recomputing the window per token (nanoGPT's generate); configs/sherlock.py's model
    per decode mode vs the weight-streaming bound and real time; SNAC's decode, one pass and streamed, vs real time."""
    model = fixtures.tiny_gpt(LAYOUT.vocab_size, 2048, n_layer=6, n_head=6, n_embd=384).to(DEVICE, DTYPE)
    prompt = random_tokens(257)  # with the context, 1800 tokens: the cached run fills the window to 2045
    ours = tokens_per_s(model, 10 if quick else 35, prompt=prompt)
    base = tokens_per_s(model, 1, prompt=prompt, frames=fixtures.nocache_frames)
    row("6L/384 ctx ~2048: KV cache vs recomputing the window per token", ours, base, "tokens/s")

    sherlock = fixtures.tiny_gpt(LAYOUT.vocab_size, **model_args("sherlock")).to(DEVICE, DTYPE)
    label = "sherlock 8L/512/ctx2048"
    n_frames = round((1 if quick else 3) * REAL_TIME / FS)
    decode_rows(sherlock, label, ("eager",) if CUDA else ("eager", "compile"), n_frames, 1 if quick else 3)
    row(f"{label} B=4 eager vs real time", tokens_per_s(sherlock, n_frames, 4, decode="eager"), REAL_TIME, "tokens/s")

    with tempfile.TemporaryDirectory() as d:
        tok = load_codec(fixtures.save_random_snac(d, fixtures.SNAC_24KHZ_CONFIG), DEVICE)
    seconds = 2 if quick else 5
    tokens = random_tokens(round(seconds * REAL_TIME / FS), seed=1)[None].to(DEVICE)  # (1, n_frames * frame_size)

    def streamed() -> None:
        dec = sampling.StreamDecoder(tok, 12)
        for f in tokens.split(FS, dim=1):
            dec.push(f)
        dec.flush()
    one_pass = timeit(lambda: tok.decode_codes(LAYOUT.tokens_to_codes(tokens)), repeat=1)
    row(f"SNAC decode {seconds} s, one pass: audio s per s vs real time", seconds / one_pass, 1.0, "x")
    row(f"SNAC decode {seconds} s, streamed in 12-frame chunks vs real time", seconds / timeit(streamed, 1), 1.0, "x")


def bench_graphs(quick: bool) -> None:
    """CUDA: configs/sherlock.py's model per captured decode mode (static steps, the frame as a CUDA graph, compiled
    steps in it) vs the bound and real time, and batch 64; SDPA's default dispatch vs the backends decoding allows;
    a long stream, its last minute vs its first."""
    if not CUDA:
        print("graphs: needs CUDA, skipped", flush=True)
        return
    sherlock = fixtures.tiny_gpt(LAYOUT.vocab_size, **model_args("sherlock")).to(DEVICE, DTYPE)
    label, n_frames = "sherlock 8L/512/ctx2048", round(10 * REAL_TIME / FS)
    decode_rows(sherlock, label, ("static", "graph", "compile"), n_frames, 1)
    for decode in ("eager", "graph"):
        row(f"{label} B=64 {decode} vs real time", tokens_per_s(sherlock, n_frames, 64, decode=decode), REAL_TIME,
            "tokens/s")

    def ms(fn, n: int = 20) -> float:
        return timeit(lambda: [fn() for _ in range(n)], repeat=1) / n * 1000
    cache, lengths = sherlock.new_kv_cache(1), iter(range(1024, 2048))

    @torch.no_grad()
    def decode_step() -> None:  # one key longer at every step, as in sampling
        cache.pos = next(lengths)
        sherlock(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), kv_cache=cache)
    default = ms(decode_step)
    with sampling.decode_context("cuda"):
        row("eager decode step, cache ~1024: decoding's attention vs the default", ms(decode_step), default, "ms", 0)

    with tempfile.TemporaryDirectory() as d:
        tok = load_codec(fixtures.save_random_snac(d, fixtures.SNAC_24KHZ_CONFIG), DEVICE)
    per_minute, minutes = round(60 * REAL_TIME / FS), 3 if quick else 10
    dec, speeds, mem, g = sampling.StreamDecoder(tok, 12), [], [], torch.Generator(device=DEVICE).manual_seed(0)
    sync()
    t0 = time.perf_counter()
    for i, frame in enumerate(sampling.sample_frames(sherlock, LAYOUT, None, minutes * per_minute, generator=g), 1):
        dec.push(frame)
        if i % per_minute == 0:  # tokens/s and allocated MiB of each minute
            sync()
            speeds.append(per_minute * FS / (time.perf_counter() - t0))
            mem.append(torch.cuda.memory_allocated() / 2**20)
            t0 = time.perf_counter()
    dec.flush()
    row(f"{minutes} min streamed, graph + codec: tokens/s, last minute vs first", speeds[-1], speeds[0], "tokens/s")
    row(f"{minutes} min streamed: allocated memory after the last minute vs the first", mem[-1], mem[0], "MiB", False)


# --- serve -------------------------------------------------------------------
def serve_requests(url: str, n: int, seconds: float, seed: int = 0) -> list[tuple[float, float, float]]:
    """n clients at once, each a continuation from nothing of `seconds` (pcm, streamed): per request (seconds to
    first audio, seconds of audio, wall seconds)."""
    import threading

    import httpx
    out: list = [None] * n

    def one(k: int) -> None:
        t0 = time.perf_counter()
        first, nbytes = None, 0
        with httpx.stream("POST", f"{url}/v1/audio/continuations", timeout=600,
                          data={"model": "gpt2o", "seconds": str(seconds), "response_format": "pcm",
                                "seed": str(seed + k)}) as r:
            r.raise_for_status()
            for chunk in r.iter_raw():
                first = first or time.perf_counter()
                nbytes += len(chunk)
        out[k] = (first - t0, nbytes / 2 / 24000, time.perf_counter() - t0)
    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError(f"{sum(o is None for o in out)} of {n} requests failed")
    return out


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def bench_serve(quick: bool) -> None:
    """serve.py with configs/sherlock.py's model (random weights) and the random SNAC on this machine, over loopback:
    aggregate seconds of audio per second for 1, 2, 4, 8 concurrent clients (and 64 on CUDA) vs the same requests
    one after another; each level's slowest stream vs real time; time to first audio p50/p95; then a bounded load
    run (a fixed count of mixed requests): failures, rows left busy, resident memory after vs before."""
    import httpx

    from checkpoints import save_checkpoint
    levels = (1, 2, 4, 8, 64) if CUDA else (1, 2, 4, 8)
    seconds = 2.0 if quick else 4.0
    with tempfile.TemporaryDirectory() as d:
        codec = fixtures.save_random_snac(os.path.join(d, "snac"), fixtures.SNAC_24KHZ_CONFIG)
        model = fixtures.tiny_gpt(LAYOUT.vocab_size, **model_args("sherlock"))
        ckpt = os.path.join(d, "ckpt.pt")
        save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                               "meta": {**load_codec(codec, weights=False).meta(), "codec": codec}, "iter_num": 0})
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={port}",
                                 f"--device={DEVICE}", f"--max_batch={max(levels)}", "--max_queue=256"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(1200):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"serve.py exited: {proc.stderr.read()}") from None
                time.sleep(0.25)
            serve_requests(url, 1, 0.5)  # warm
            t0 = time.perf_counter()
            serial = [serve_requests(url, 1, seconds, seed=k)[0] for k in range(4)]
            serial_rate = sum(r[1] for r in serial) / (time.perf_counter() - t0)
            ttfa1 = float(np.median([r[0] for r in serial]))
            for n in levels:
                t0 = time.perf_counter()
                res = serve_requests(url, n, seconds, seed=100 * n)
                wall = time.perf_counter() - t0
                ttfa = np.array([r[0] for r in res]) * 1000
                row(f"serve {n:>2} clients x {seconds:g} s: audio s/s vs the same one after another",
                    sum(r[1] for r in res) / wall, serial_rate, "x")
                row(f"serve {n:>2} clients: the slowest stream vs real time", min(r[1] / r[2] for r in res), 1.0, "x")
                row(f"serve {n:>2} clients: time to first audio p50 (p95 {np.percentile(ttfa, 95):.0f} ms) vs 1 alone",
                    float(np.median(ttfa)), ttfa1 * 1000, "ms", False)
            # the load run: a fixed count of mixed lengths, 4 clients at a time
            before = resident_mib(proc.pid)
            count, done = (16 if quick else 48), 0
            for k in range(0, count, 4):
                done += len(serve_requests(url, 4, [0.5, 1.0, 2.0, 3.0][k % 4], seed=1000 + k))
            h = httpx.get(f"{url}/health").json()
            after = resident_mib(proc.pid)
            row(f"serve load run: {done} of {count} requests complete, rows busy after: {h['active']}",
                done, count, "requests")
            row("serve load run: resident memory after vs before", after, before, "MiB", False)
        finally:
            proc.terminate()
            proc.wait(60)

# --- eval ---------------------------------------------------------------------
def bench_eval(quick: bool) -> None:
    """eval_tts.py's rows per minute vs generating them alone, and the share of training time that eval_asr's
    WER takes. Random models of real sizes: Whisper-large-v3's on CUDA, Whisper-tiny's on a CPU."""
    import soundfile as sf
    from evalset import SENTENCES, speak
    from samples import SAMPLE_SHARE
    from tokenizer import load_text_encoding
    encoding = next((e for e in ("gpt2", "gpt2o_test") if _loads(load_text_encoding, e)), None)
    if encoding is None:
        print("eval: needs a text encoding: tiktoken's gpt2 (downloaded once), or the tests' offline one with "
              "PYTHONPATH=tests/plugins; skipped", flush=True)
        return
    sizes, n_rows, seconds = (fixtures.WHISPER_LARGE_V3, 8, 5.0) if CUDA else \
        (fixtures.WHISPER_TINY, 2, 1.0) if quick else (fixtures.WHISPER_TINY, 4, 3.0)
    n_layer, n_embd, block = (8, 512, 1024) if CUDA or not quick else (2, 64, 512)  # configs/ljspeech.py's shape
    with tempfile.TemporaryDirectory() as tmp:
        codec = fixtures.save_random_snac(f"{tmp}/snac", fixtures.SNAC_24KHZ_CONFIG)
        tok = load_codec(codec, DEVICE, text_encoding=encoding)
        asr = fixtures.save_tiny_whisper(f"{tmp}/asr", sizes=sizes, max_length=32)  # a sentence's worth of tokens
        sv = fixtures.save_tiny_wavlm_sv(f"{tmp}/sv", base=True)
        model = fixtures.tiny_gpt(tok.layout.vocab_size, block, 0, n_embd, n_layer, n_head=n_layer)
        ckpt = f"{tmp}/ckpt.pt"
        save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                               "meta": {**tok.meta(), "codec": codec}, "iter_num": 0})
        os.makedirs(f"{tmp}/list/wavs")
        lines = []
        for i, sentence in enumerate(SENTENCES[:n_rows]):  # Seed-TTS rows: with a voice, so SIM and the ceiling run
            sf.write(f"{tmp}/list/wavs/{i}.wav", fixtures.synth_audio(2.0, 16000, seed=i), 16000)
            lines.append(f"r{i}|{SENTENCES[-1 - i].text}|wavs/{i}.wav|{sentence.text}")
        with open(f"{tmp}/list/meta.lst", "w") as f:
            f.write("\n".join(lines) + "\n")
        r = subprocess.run([sys.executable, f"{ROOT}/eval_tts.py", f"--ckpt={ckpt}", f"--list={tmp}/list/meta.lst",
                            f"--out_dir={tmp}/eval", f"--asr={asr}", f"--sv={sv}", f"--max_seconds={seconds}",
                            f"--device={DEVICE}", "--utmos=False"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"error: eval_tts.py failed: {r.stderr[-2000:]}")
        with open(f"{tmp}/eval/eval.json") as f:
            ours = json.load(f)["rows_per_minute"]
        model = model.to(DEVICE)
        g = torch.Generator(DEVICE).manual_seed(0)
        t0 = time.perf_counter()
        for i, sentence in enumerate(SENTENCES[:n_rows]):  # the same rows, with the same voice prompts
            wav = torch.from_numpy(tok.encode(fixtures.synth_audio(2.0, 16000, seed=i), 16000)).to(DEVICE)
            speak(model, tok, sentence.text, wav, SENTENCES[-1 - i].text, max_seconds=seconds, generator=g)
        sync()
        base = n_rows / (time.perf_counter() - t0) * 60
        row(f"eval_tts.py rows/min ({seconds:g} s each, + ASR, SV, ceiling) vs generating them alone", ours, base,
            "rows/min")

        # train.py with eval_asr: the scoring's time per eval against the training time between two evals
        interval = 20 if quick else 100  # configs/tiny.py's eval_interval
        fixtures.random_dataset(f"{tmp}/data", tok.layout, [200_000], [20_000], codec=codec)
        r = subprocess.run([sys.executable, f"{ROOT}/train.py", f"{ROOT}/configs/tiny.py", f"--data_dir={tmp}/data",
                            f"--out_dir={tmp}/out", f"--device={DEVICE}", f"--max_iters={interval}",
                            f"--eval_interval={interval}", "--log_interval=1", f"--eval_asr={asr}",
                            f"--eval_sv={sv}"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"error: train.py failed: {r.stderr[-2000:]}")
        with open(f"{tmp}/out/log.jsonl") as f:
            rows = list(map(json.loads, f))
        step_s = np.median([x["ms"] for x in rows if "ms" in x and x["iter"] > 0]) / 1000
        scoring = np.median([x["asr_s"] for x in rows if "asr_s" in x])
        share = scoring / (interval * step_s)
        row(f"eval_asr's WER of 2 spoken samples: share of {interval} training iterations (configs/tiny.py)",
            share * 100, SAMPLE_SHARE * 100, "%", higher_is_better=False)


def _loads(load, name: str) -> bool:
    try:
        load(name)
        return True
    except Exception:  # offline without the encoding's files
        return False

# --- chat ---------------------------------------------------------------------

def bench_chat(quick: bool) -> None:
    """chat.py's replies with configs/ljspeech.py's model in the chat layout, batch 1: the time to first audio (from
    the end of the user's turn to the first decoded samples) vs the whole reply, its real-time factor, and a reply
    once the conversation fills the context (oldest turns leaving) vs the first reply."""
    layout = Layout((4, 2, 1), 4096, "gpt2", 50257, chat=True)  # GPT-2's BPE ids: no encoding is loaded
    model = fixtures.tiny_gpt(layout.vocab_size, **model_args("ljspeech")).to(DEVICE, DTYPE)
    with tempfile.TemporaryDirectory() as d:
        tok = load_codec(fixtures.save_random_snac(d, fixtures.SNAC_24KHZ_CONFIG), DEVICE)
    tok.layout = layout
    n_frames = round((2 if quick else 4) * REAL_TIME / FS)  # the reply's speech
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def reply(turns: list[tuple], prefix=None) -> tuple[float, float, int, np.ndarray]:
        t0 = time.perf_counter()
        context = torch.from_numpy(layout.chat_context(turns))
        text = sampling.write_text(model, layout, context, 16, generator=g, prefix=prefix)
        sp = layout.special_tokens
        spoken = torch.cat([context, torch.tensor([*text, sp["text_end"], sp["audio_start"]])])
        dec, first, frames = sampling.StreamDecoder(tok, 12), None, []
        for frame in sampling.sample_frames(model, layout, None, n_frames, context=spoken, generator=g,
                                            prefix=prefix):
            frames.append(frame)
            if dec.push(frame) is not None and first is None:
                sync()
                first = time.perf_counter() - t0
        dec.flush()
        sync()
        speech = torch.cat(frames, dim=1)[0].cpu().numpy()
        return first or time.perf_counter() - t0, time.perf_counter() - t0, len(context), speech

    turns: list[tuple] = [("system", np.arange(10), None)]
    speeds, cache = [], sampling.PrefixCache(model)  # the conversation in the KV cache, as chat.py keeps it
    for turn in range(4 if quick else 8):
        user = random_tokens(round(2 * REAL_TIME / FS), seed=turn).numpy() + layout.audio_offset  # 2 s spoken
        turns = layout.fit_turns(turns + [("user", None, user)], 16 + 2 + n_frames * FS, model.config.block_size)
        first, total, n_context, speech = reply(turns, cache)
        speeds.append((n_context, (len(speech) + 16) / total))
        if turn == 1:  # the first turn the cache can help: the same reply prefilled from nothing
            row(f"chat turn 2 (context {n_context} ids): time to first audio, KV cache kept vs prefilled anew",
                first, reply(turns)[0], "s", higher_is_better=False)
        if turn == 0:
            row(f"chat reply {n_frames * 2048 / 24000:.1f} s, 8L/512: time to first audio vs the whole reply", first,
                total, "s", higher_is_better=False)
            row("chat reply: audio seconds per second vs real time", n_frames * 2048 / 24000 / total, 1.0, "x")
        turns.append(("assistant", np.arange(16), speech))
    row(f"chat reply at turn {len(speeds)} (context {speeds[-1][0]} ids, sliding) vs turn 1 ({speeds[0][0]} ids)",
        speeds[-1][1], speeds[0][1], "tokens/s")


PARTS = {  # name: (function, what it compares)
    "tokenizer": (bench_tokenizer, "codes <-> tokens: the layout vs the seed's per-token loops"),
    "prepare": (bench_prepare, "prepare_audio.py end to end vs the bare batched SNAC encode"),
    "handoff": (bench_handoff, "CUDA only: codes back to the host, codes_to_host vs .cpu()"),
    "train": (bench_train, "train.py vs a plain nanoGPT loop on the same model and data, MFU; FSDP vs DDP"),
    "gpt2": (bench_gpt2, "uint32 vs uint16 shards in train.py; fine-tuning from GPT-2 vs scratch (needs the Hub)"),
    "generate": (bench_generate, "KV cache vs recompute; decode vs weight-streaming bound and real time; codec"),
    "eval": (bench_eval, "eval_tts.py rows/min vs generation alone; eval_asr's share of training time (budget 10%)"),
    "chat": (bench_chat, "chat.py's replies: time to first audio, real-time factor, speed as the context slides"),
    "graphs": (bench_graphs, "CUDA only: graph/static/compile decode, batch 64, attention backends, long stream"),
    "serve": (bench_serve, "serve.py: 1-8 (64 on CUDA) concurrent clients vs serial, time to first audio, load run"),
    "all": (None, "every part"),
}


def main() -> None:
    parts = "\n".join(f"  {name:<10} {what}" for name, (_, what) in PARTS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=f"parts:\n{parts}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="part", help="parts to run (below), or all of them")
    parser.add_argument("--quick", action="store_true", help="every part at its smallest size")
    args = parser.parse_args()
    for p in set(args.parts) - set(PARTS):
        parser.error(f"unknown part {p!r} (choose from {', '.join(PARTS)})")
    if not args.parts:
        return parser.print_help()
    print(header(), flush=True)
    for name in [p for p in PARTS if p != "all"] if "all" in args.parts else dict.fromkeys(args.parts):
        print(f"== {name} ==", flush=True)
        PARTS[name][0](args.quick)


if __name__ == "__main__":
    main()
