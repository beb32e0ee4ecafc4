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


def bench_train(quick: bool) -> None:
    """train.py's tokens/s and MFU vs a plain nanoGPT-style loop's, same model and data (compile + bf16 on CUDA)."""
    n_layer, n_head, n_embd, block, batch, iters, warm = (
        (12, 12, 768, 1024, 16, 30, 10) if CUDA else (2, 2, 128, 256, 4, 8, 2) if quick else (6, 6, 384, 512, 8, 6, 1))
    with tempfile.TemporaryDirectory() as tmp:
        fixtures.random_dataset(f"{tmp}/data", LAYOUT, [3_000_000], [50_000])
        peak = 0.0 if CUDA else measure_matmul_flops("cpu", n=2048)  # 0: train.py looks up the GPU's data sheet
        r = subprocess.run([sys.executable, f"{ROOT}/train.py", f"--data_dir={tmp}/data", f"--out_dir={tmp}/out",
                            f"--device={DEVICE}", f"--compile={CUDA}", f"--n_layer={n_layer}", f"--n_head={n_head}",
                            f"--n_embd={n_embd}", f"--block_size={block}", f"--batch_size={batch}",
                            f"--max_iters={iters}", f"--peak_flops={peak}", "--gradient_accumulation_steps=1",
                            "--log_interval=1", "--eval_interval=1000", "--eval_iters=1", "--eval_samples=0"],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"error: train.py failed: {r.stderr[-2000:]}")
        with open(f"{tmp}/out/log.jsonl") as f:
            rows = [x for x in map(json.loads, f) if "ms" in x and x["iter"] >= warm]
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

    def reply(turns: list[tuple]) -> tuple[float, float, int, np.ndarray]:
        t0 = time.perf_counter()
        context = torch.from_numpy(layout.chat_context(turns))
        text = sampling.write_text(model, layout, context, 16, generator=g)
        sp = layout.special_tokens
        spoken = torch.cat([context, torch.tensor([*text, sp["text_end"], sp["audio_start"]])])
        dec, first, frames = sampling.StreamDecoder(tok, 12), None, []
        for frame in sampling.sample_frames(model, layout, None, n_frames, context=spoken, generator=g):
            frames.append(frame)
            if dec.push(frame) is not None and first is None:
                sync()
                first = time.perf_counter() - t0
        dec.flush()
        sync()
        speech = torch.cat(frames, dim=1)[0].cpu().numpy()
        return first or time.perf_counter() - t0, time.perf_counter() - t0, len(context), speech

    turns: list[tuple] = [("system", np.arange(10), None)]
    speeds = []
    for turn in range(4 if quick else 8):
        user = random_tokens(round(2 * REAL_TIME / FS), seed=turn).numpy() + layout.audio_offset  # 2 s spoken
        turns = layout.fit_turns(turns + [("user", None, user)], 16 + 2 + n_frames * FS, model.config.block_size)
        first, total, n_context, speech = reply(turns)
        speeds.append((n_context, (len(speech) + 16) / total))
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
    "train": (bench_train, "train.py vs a plain nanoGPT loop on the same model and data, and MFU"),
    "generate": (bench_generate, "KV cache vs recompute; decode vs weight-streaming bound and real time; codec"),
    "chat": (bench_chat, "chat.py's replies: time to first audio, real-time factor, speed as the context slides"),
    "graphs": (bench_graphs, "CUDA only: graph/static/compile decode, batch 64, attention backends, long stream"),
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
