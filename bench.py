"""Throughput benchmarks. Every figure is printed beside its baseline measured in the same run, as a ratio,
because shared machines are noisy.

    python bench.py                 # everything
    python bench.py tokenizer       # one part: tokenizer, prepare, train, generate, watch
"""
from __future__ import annotations

import sys
import time


def timeit(fn, repeat: int = 3, warm_up=None) -> float:
    """Best wall time of `repeat` calls, after one warm-up call (of `warm_up` if given, else of fn)."""
    (warm_up or fn)()
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
def _blog_flatten(codes: list, separator: int = 4097) -> list[list[int]]:
    """The original blog's flattening, as the baseline: per-token .item() loops and a separator before every frame."""
    flattened = []
    for b in range(codes[0].size(0)):
        row = []
        for i in range(codes[0].size(1)):
            row.append(separator)
            row.append(codes[0][b][i].item())
            for j in range(2):
                row.append(codes[1][b][j + i * 2].item())
                for k in range(2):
                    row.append(codes[2][b][k + j * 2 + i * 4].item())
        flattened.append(row)
    return flattened


def _blog_unflatten(row: list[int], separator: int = 4097) -> list:
    """The original blog's unflattening: a per-token scan that rebuilds the code tensors after every frame."""
    import torch
    row = row[row.index(separator):]
    l0, l1, l2, codes = [], [], [], []
    for i in range(0, len(row), 8):
        l0.append(row[i + 1])
        l1.append(row[i + 2])
        l2.append(row[i + 3])
        l2.append(row[i + 4])
        l1.append(row[i + 5])
        l2.append(row[i + 6])
        l2.append(row[i + 7])
        codes = [torch.tensor(l0).unsqueeze(0), torch.tensor(l1).unsqueeze(0), torch.tensor(l2).unsqueeze(0)]
    return codes


def bench_tokenizer() -> None:
    import torch
    from tokenizer import Layout
    layout = Layout((4, 2, 1), 4096)  # snac_24khz
    n_frames = -(-60 * 24000 // 2048)  # 60 s of audio = 704 frames
    n_codes = n_frames * layout.frame_size
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 4096, (1, n_frames * k), generator=gen) for k in layout.codes_per_frame]
    back = _blog_unflatten(_blog_flatten(codes)[0])
    assert all(torch.equal(a, b) for a, b in zip(back, codes)), "baseline round trip is wrong"
    base = timeit(lambda: _blog_unflatten(_blog_flatten(codes)[0]), repeat=2)
    ours = timeit(lambda: layout.tokens_to_codes(layout.codes_to_tokens(codes)), repeat=20)
    back = layout.tokens_to_codes(layout.codes_to_tokens(codes))
    assert all(torch.equal(a, b) for a, b in zip(back, codes)), "round trip is wrong"
    row(f"codes<->tokens round trip, 60 s ({n_codes} codes), torch", n_codes / ours, n_codes / base, "codes/s")
    np_codes = [c.numpy() for c in codes]
    ours_np = timeit(lambda: layout.tokens_to_codes(layout.codes_to_tokens(np_codes)), repeat=20)
    row(f"codes<->tokens round trip, 60 s ({n_codes} codes), numpy", n_codes / ours_np, n_codes / base, "codes/s")


# --- prepare ------------------------------------------------------------------
def bench_prepare() -> None:
    """(a) prepare_audio.py's wall time, process start included, vs the bare batched SNAC encode of the same audio
    (already at 24 kHz mono on the device: no reading, resampling or writing); (b) the codes of a chunked, batched
    encode vs one pass over two minutes of audio."""
    import os
    import shutil
    import subprocess
    import tempfile
    import soundfile as sf
    import torch
    root = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(root, "tests"))
    from conftest import SNAC_24KHZ_CONFIG, save_random_snac, synth_audio
    from tokenizer import load_codec
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    # two kinds of file, neither at the codec rate, each longer than one 60 s chunk (so chunk overlap is paid). On a
    # CPU 3 minutes; on a GPU 10-minute files copied 24 times (8 hours), so start-up is a small part of the run
    files = {"a_16k_mono.flac": (80.0, 16000, 1), "b_44k_stereo.wav": (100.0, 44100, 2)}
    copies = 1
    if cuda:
        files, copies = {"a_16k_mono.flac": (600.0, 16000, 1), "b_44k_stereo.wav": (600.0, 44100, 2)}, 24
    hours = copies * sum(seconds for seconds, _, _ in files.values()) / 3600
    chunk, batch = 60.0, 4 if cuda else 1  # prepare_audio.py's defaults: 60 s chunks, 4 per codec call on CUDA
    with tempfile.TemporaryDirectory() as tmp:
        codec_dir = save_random_snac(os.path.join(tmp, "codec"), SNAC_24KHZ_CONFIG)
        audio_dir = os.path.join(tmp, "audio")
        os.makedirs(audio_dir)
        for i, (name, (seconds, rate, channels)) in enumerate(files.items()):
            sf.write(os.path.join(audio_dir, f"000_{name}"), synth_audio(seconds, rate, channels, seed=i), rate)
            for c in range(1, copies):
                shutil.copy(os.path.join(audio_dir, f"000_{name}"), os.path.join(audio_dir, f"{c:03d}_{name}"))
        tok = load_codec(codec_dir, device)
        step = round(chunk * tok.sample_rate)
        by_length: dict[int, list] = {}  # the bare codec's input: 60 s chunks, grouped by length for batching
        for name in files:
            mono = tok.to_mono(*sf.read(os.path.join(audio_dir, f"000_{name}"), dtype="float32")).to(device)
            for _ in range(copies):
                for i in range(0, len(mono), step):
                    by_length.setdefault(len(mono[i:i + step]), []).append(mono[i:i + step])

        @torch.inference_mode()
        def bare(limit: int | None = None) -> None:
            calls = [same[j:j + batch] for same in by_length.values() for j in range(0, len(same), batch)]
            for chunks in calls[:limit]:
                tok.codec.encode(torch.stack(chunks)[:, None])  # (B, 1, samples)
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            bare(limit=2)  # warm-up: CUDA context, cuDNN
        t0 = time.perf_counter()
        bare()
        base = time.perf_counter() - t0
        by_length.clear()  # free the device for prepare_audio.py
        if cuda:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        # the default text+audio layout, with the tests' tiktoken encoding standing in for GPT-2's (no download)
        plugins = os.path.join(root, "tests", "plugins")
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([plugins, os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, os.path.join(root, "prepare_audio.py"), f"--codec={codec_dir}",
                            f"--dataset={audio_dir}", f"--out_dir={os.path.join(tmp, 'out')}", f"--device={device}",
                            f"--chunk_seconds={chunk}", f"--batch_seconds={batch * chunk}",
                            "--text_encoding=gpt2o_test"], capture_output=True, text=True, env=env)
        ours = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(f"error: prepare_audio.py failed: {r.stderr[-2000:]}")
    row(f"prepare_audio.py, {hours * 60:.0f} min of audio, {where} (wall)", ours, base, "s", higher_is_better=False)
    print(f"prepare_audio.py takes {ours / base:.2f}x the time of the bare batched encode ({batch} x {chunk:.0f} s per "
          f"call) on {where} (target <= {2 if cuda else 1.15}x)", flush=True)
    account = next((ln for ln in r.stdout.splitlines() if ln.startswith("time: ")), "")
    print(f"  prepare_audio.py's own account, {where}: {account or '(none)'}", flush=True)
    if account:  # the rest is the interpreter: importing torch before main() and tearing it down after
        print(f"  outside its own timer (Python start, imports, exit), {where}: "
              f"{ours - float(account.split()[1]):.1f} s", flush=True)
    bench_handoff()

    # (b) the long version of tests/test_tokenizer.py's chunking test: 20 s chunks, 3 per call, two clips at once
    clips = [tok.to_mono(synth_audio(seconds, 24000, seed=7 + i), 24000) for i, seconds in enumerate((120.0, 50.0))]
    many = tok.encode_many(clips, chunk_seconds=20, batch_seconds=60)
    for clip, codes in zip(clips, many):
        one = torch.cat(tok.encode_codes(clip, chunk_seconds=1000))  # a single codec call
        same = (torch.cat(codes) == one).float().mean().item()
        print(f"chunked + batched codes equal to one pass, {len(clip) / 24000:.0f} s clip, {where}: {same:.2%} "
              "(target >= 99%)", flush=True)


def bench_handoff() -> None:
    """The CPU time prepare_audio.py's main process spends receiving 10 minutes of decoded audio (24 kHz float32,
    57.6 MB) from a worker process: in a file (decode_to_file, what it does) vs through the pool's pipe, pickled."""
    import multiprocessing
    import os
    import tempfile
    import soundfile as sf
    import prepare_audio
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from conftest import synth_audio
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.get_context("fork").Pool(1) as pool:
        wav = os.path.join(tmp, "a.wav")
        sf.write(wav, synth_audio(600.0, 44100, 2), 44100)
        cpu = {}
        for how in ("file", "pipe"):
            best = float("inf")
            for i in range(3):
                t0 = time.process_time()  # every thread of this process: the pool's result handler too
                if how == "file":
                    got = prepare_audio.take_audio_file(pool.apply(prepare_audio.decode_to_file,
                                                                   (wav, 24000, 2048, os.path.join(tmp, f"{i}.f32"))))
                else:
                    got = pool.apply(prepare_audio.decode_audio, (wav, 24000, 2048))
                best = min(best, time.process_time() - t0)
                assert len(got["audio"]) == 600 * 24000
            cpu[how] = best
    row("main-process CPU to receive 10 min of decoded audio: file vs pipe", cpu["file"], cpu["pipe"], "s",
        higher_is_better=False)


# --- train --------------------------------------------------------------------
def bench_train() -> None:
    """(a) train.py's tokens/s vs a plain nanoGPT-style loop on the same model, (b) its MFU against the float32
    matmul FLOP/s measured here, (c) resident memory on 200M vs 2M tokens of shards; on a GPU, GPT-2 124M MFU."""
    import json
    import os
    import subprocess
    import tempfile
    import numpy as np
    import torch
    from model import GPT, GPTConfig
    from tokenizer import Layout
    from common import measure_matmul_flops

    root = os.path.dirname(os.path.abspath(__file__))
    layout = Layout((4, 2, 1), 4096)

    # the text+audio layout with GPT-2's BPE: only its size matters here (no text is encoded, so no BPE file)
    text_layout = Layout((4, 2, 1), 4096, "gpt2", 50257)

    def write_data(folder: str, train_sizes: list[int], val_sizes: list[int], sparse: bool = False,
                   layout: Layout = layout) -> str:
        """A dataset in prepare_audio.py's format: random valid ids, or sparse all-zero files (id 0 is a valid
        level-0 code, or text id) so 200M tokens cost no disk time."""
        os.makedirs(folder, exist_ok=True)
        shards, rng = [], np.random.default_rng(0)
        for split, sizes in (("train", train_sizes), ("val", val_sizes)):
            for i, n in enumerate(sizes):
                name = f"{split}_{i:03d}.bin"
                with open(os.path.join(folder, name), "wb") as f:
                    if sparse:
                        f.truncate(2 * n)
                    else:
                        rng.integers(0, layout.vocab_size, n, dtype=np.uint16).tofile(f)
                shards.append({"file": name, "split": split, "tokens": n, "sources": []})
        meta = {"codec": "bench", "sample_rate": 24000, "frame_hop": 2048, "tokens_per_second": 24000 / 2048 * 7,
                **layout.meta(), "dtype": "uint16", "dataset": "bench", "shards": shards, "skipped": [], "splits": {}}
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f)
        return folder

    def sherlock_steps(device: str, batch: int, rounds: int) -> dict[str, tuple[int, float, int]]:
        """configs/sherlock.py's model (8 x 512, block 2048) on each vocab: parameters, training tokens/s (AdamW
        steps of the two models in turns, the best of `rounds` after a warm-up) and, on CUDA, the peak memory of
        each model trained alone (bf16 autocast there, float32 on CPU)."""
        vocabs = {"audio": layout.vocab_size, "text": text_layout.vocab_size}
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def build(vocab_size: int) -> tuple:
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=vocab_size, block_size=2048, n_layer=8, n_head=8, n_embd=512)).to(device)
            return (model, model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), device),
                    torch.randint(0, vocab_size, (batch, 2049), device=device))

        def step(model, opt, x) -> float:
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - t0

        memory = dict.fromkeys(vocabs, 0)
        if device == "cuda":
            for name, vocab_size in vocabs.items():
                built = build(vocab_size)
                torch.cuda.reset_peak_memory_stats()
                step(*built)
                step(*built)
                memory[name] = torch.cuda.max_memory_allocated()
                del built
                torch.cuda.empty_cache()
        models = {name: build(vocab_size) for name, vocab_size in vocabs.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds + 1):  # the first round warms up
            for name, built in models.items():
                times[name].append(step(*built))
        return {name: (models[name][0].get_num_params(), batch * 2048 / min(times[name][1:]), memory[name])
                for name in models}

    def run_train(args: list[str], threads: int = 0) -> tuple[list[dict], int]:
        """train.py in a subprocess -> its log.jsonl rows and its peak resident memory in bytes.

        The peak is the child's own VmHWM, polled: wait4's ru_maxrss would carry this (large) process's peak
        across the fork + exec."""
        out = args[-1].split("=", 1)[1]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        p = subprocess.Popen([sys.executable, os.path.join(root, "train.py")] + args, cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")])
            except OSError:  # not Linux, or it just exited
                pass
            time.sleep(0.05)
        if p.returncode:
            raise SystemExit(f"error: train.py failed: {p.stderr.read()}")
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line) for line in f], peak

    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(os.path.join(tmp, "data"), [3_000_000], [50_000])
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for block, batch in ((1024, 16), (2048, 8)):
                rows, _ = run_train([f"--data_dir={data}", "--n_layer=12", "--n_head=12", "--n_embd=768",
                                     f"--block_size={block}", f"--batch_size={batch}",
                                     "--gradient_accumulation_steps=4",
                                     "--max_iters=60", "--log_interval=10", "--eval_interval=1000", "--eval_iters=1",
                                     "--compile=True", f"--out_dir={tmp}/gpu{block}"])
                last = [r for r in rows if "mfu" in r][-1]  # after compile and warm-up
                print(f"GPT-2 124M, block {block}, bf16 + compile on {name}: {last['tok_s']:,.0f} tok/s, "
                      f"MFU {last['mfu'] * 100:.1f}% of the data-sheet peak", flush=True)
            # what the text+audio vocab costs on this GPU: configs/sherlock.py's model and micro-batch, bf16
            speed = sherlock_steps("cuda", batch=8, rounds=4)
            (pa, ta, ma), (pt, tt, mt) = speed["audio"], speed["text"]
            print(f"sherlock config on {name}, batch 8 x 2048, bf16: parameters {pt / 1e6:.1f}M vs {pa / 1e6:.1f}M, "
                  f"peak memory {mt / 2**30:.2f} GiB (vocab {text_layout.vocab_size:,}) vs {ma / 2**30:.2f} GiB "
                  f"(vocab {layout.vocab_size:,})", flush=True)
            row("sherlock config training, text+audio vocab (GPU)", tt, ta, "tok/s")
            return

        # (a) + (b): nanoGPT's CPU reference size, 6 layers x 6 heads x 384, block 512, batch 8, float32
        n_layer, n_head, n_embd, block, batch, iters = 6, 6, 384, 512, 8, 6
        args = [f"--data_dir={data}", "--device=cpu", "--compile=False", f"--n_layer={n_layer}", f"--n_head={n_head}",
                f"--n_embd={n_embd}", f"--block_size={block}", f"--batch_size={batch}",
                "--gradient_accumulation_steps=1",
                f"--max_iters={iters}", "--log_interval=1", "--eval_interval=1000", "--eval_iters=1", "--peak_flops=1"]
        rows, _ = run_train(args + [f"--out_dir={tmp}/ours"])
        ours = batch * block / (np.median([r["ms"] for r in rows if "ms" in r and r["iter"] > 0]) / 1000)

        # the baseline: nanoGPT's train.py loop reduced to its essentials, on the same model and data
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=block, vocab_size=layout.vocab_size, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd, dropout=0.0, bias=False))
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            m = np.memmap(os.path.join(data, "train_000.bin"), dtype=np.uint16, mode="r")
            ix = torch.randint(len(m) - block, (batch,))
            x = torch.stack([torch.from_numpy(m[i:i + block].astype(np.int64)) for i in ix])
            y = torch.stack([torch.from_numpy(m[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t0)
        base = batch * block / np.median(times[1:])
        row(f"train.py CPU fp32 {n_layer}x{n_embd} block {block} batch {batch}", ours, base, "tok/s")
        matmul = measure_matmul_flops("cpu", n=2048)
        mfu = model.flops_per_token(block) * ours / matmul
        mfu_base = model.flops_per_token(block) * base / matmul
        print(f"MFU vs this machine's float32 matmul ({matmul / 1e9:.0f} GFLOP/s, 2048x2048): train.py "
              f"{mfu * 100:.0f}%, plain loop {mfu_base * 100:.0f}%", flush=True)

        # (c) memory does not grow with the dataset: np.memmap, never whole shards in memory
        rss = {}
        for n_tokens in (2_000_000, 200_000_000):
            folder = write_data(os.path.join(tmp, f"rss{n_tokens}"), [n_tokens // 4] * 4, [20_000], sparse=True)
            _, rss[n_tokens] = run_train([f"--data_dir={folder}", "--device=cpu", "--compile=False", "--n_layer=2",
                                          "--n_head=2", "--n_embd=64", "--block_size=256", "--batch_size=8",
                                          "--gradient_accumulation_steps=1",
                                          "--max_iters=20", "--eval_interval=10", "--eval_iters=4", "--peak_flops=1",
                                          f"--out_dir={tmp}/rss{n_tokens}"], threads=1)
        growth = (rss[200_000_000] - rss[2_000_000]) / 2**20
        print(f"peak RSS training on 200M tokens {rss[200_000_000] / 2**20:.0f} MB vs 2M tokens "
              f"{rss[2_000_000] / 2**20:.0f} MB: {growth:+.1f} MB (target: within 50 MB)", flush=True)

        # (d) what the text+audio vocab costs: configs/sherlock.py's model (8 x 512, block 2048) at batch 1. Peak
        #     memory of train.py on each vocab; speed from steps of the two models taken in turns in this process,
        #     so both see the same machine load
        figures = {}
        for name, lay in (("audio", layout), ("text", text_layout)):
            folder = write_data(os.path.join(tmp, f"vocab_{name}"), [300_000], [5_000], layout=lay)
            _, peak = run_train([f"--data_dir={folder}", "--device=cpu", "--compile=False", "--n_layer=8",
                                 "--n_head=8", "--n_embd=512", "--block_size=2048", "--batch_size=1",
                                 "--gradient_accumulation_steps=1", "--max_iters=2", "--log_interval=1",
                                 "--eval_interval=1000", "--eval_iters=1", "--peak_flops=1",
                                 f"--out_dir={tmp}/vocab_{name}"])
            figures[name] = (lay.vocab_size, peak)
        speed = sherlock_steps("cpu", batch=1, rounds=3)
        (va, ma), (vt, mt) = figures["audio"], figures["text"]
        print(f"sherlock config, vocab {vt:,} (text+audio, GPT-2 BPE) vs {va:,} (audio only): parameters "
              f"{speed['text'][0] / 1e6:.1f}M vs {speed['audio'][0] / 1e6:.1f}M, train.py peak RSS at batch 1 "
              f"{mt / 2**20:.0f} MB vs {ma / 2**20:.0f} MB ({(mt - ma) / 2**20:+.0f} MB)", flush=True)
        row("sherlock config CPU training step, batch 1: text+audio vocab", speed["text"][1], speed["audio"][1],
            "tok/s")


# --- generate -----------------------------------------------------------------
def _sample_before(model, layout, n_frames: int, num_samples: int, generator) -> None:
    """The sampling loop as it was before issue 12, as the baseline: a cache attended over its filled positions,
    logits of the whole vocabulary masked per frame position, torch.multinomial, PyTorch's default attention
    dispatch (cuDNN on Hopper). No prompt, no slides."""
    import torch
    fs, device = layout.frame_size, model.lm_head.weight.device
    ids = torch.arange(model.config.vocab_size)
    lo = torch.as_tensor(layout.frame_levels * layout.codebook_size)[:, None]
    masks = torch.zeros(fs, len(ids)).masked_fill(~((ids >= lo) & (ids < lo + layout.codebook_size)), float("-inf"))
    masks = masks.to(device)
    buf = torch.full((num_samples, 1 + n_frames * fs), layout.boundary_id, dtype=torch.long, device=device)
    cache = model.new_kv_cache(num_samples)
    with torch.no_grad():
        for n in range(1, 1 + n_frames * fs):
            logits, _ = model(buf[:, n - 1:n], kv_cache=cache)
            probs = torch.softmax(logits[:, -1, :].float() + masks[(n - 1) % fs], dim=-1)
            buf[:, n:n + 1] = torch.multinomial(probs, num_samples=1, generator=generator)


def bench_generate() -> None:
    """Sampling speed per decode mode against its baselines: full recompute (nanoGPT's generate), the loop before
    issue 12, real time, and on a CPU the weight-streaming bound; on CUDA also the attention backends, time to first
    audio through generate.py, and a 10-minute stream. Random weights: speed does not depend on them."""
    import os
    import subprocess
    import tempfile
    import torch
    import torch.nn.functional as F
    import fixtures
    import sampling
    from common import read_config_file, save_checkpoint
    from model import GPT, GPTConfig
    from tokenizer import Layout, load_codec
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "tests"))
    from conftest import SNAC_24KHZ_CONFIG, save_random_snac

    layout = Layout((4, 2, 1), 4096)  # SNAC 24 kHz
    fs, real_time = layout.frame_size, 24000 / 2048 * layout.frame_size  # 82.03 tokens per second of audio
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32  # what generate.py picks
    card = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {card}, {str(dtype)[6:]} weights; real time for SNAC 24 kHz = {real_time:.2f} tokens/s")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def config(name: str) -> dict:
        cfg = read_config_file(os.path.join(here, "configs", f"{name}.py"))
        return {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}

    def gpt(n_layer: int, n_head: int, n_embd: int, block_size: int, on: str = device) -> GPT:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd)).eval()
        return model.to(on, dtype if on == "cuda" else torch.float32)

    def random_tokens(n_frames: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        frames = torch.randint(0, layout.codebook_size, (n_frames, fs), generator=g)
        return (frames + torch.from_numpy(layout.frame_levels * layout.codebook_size)).reshape(-1)

    def tokens_per_s(model, n_frames: int, b: int = 1, prompt=None, repeat: int = 1, **kw) -> float:
        """Sampling speed (new tokens of all rows per second, the prefill included), the best of `repeat` runs
        after a warm-up run that also captures or compiles; temperature 1, no top-k/top-p."""
        def run() -> None:
            g = torch.Generator(device=model.lm_head.weight.device).manual_seed(0)
            sampling.generate_tokens(model, layout, prompt, n_frames, num_samples=b, generator=g, **kw)
            sync()
        return b * n_frames * fs / timeit(run, repeat)

    def before_per_s(model, n_frames: int, b: int = 1, repeat: int = 1) -> float:
        def run(frames: int = n_frames) -> None:
            _sample_before(model, layout, frames, b, torch.Generator(device=model.lm_head.weight.device))
            sync()
        # warm up on one frame: the old loop runs ~15 tokens/s on a GPU
        return b * n_frames * fs / timeit(run, repeat, warm_up=lambda: run(1))

    # 1. the KV cache against recomputing the whole context per token, a 6-layer n_embd 384 model at a 2048-token
    #    context: the prompt fills it to ~1800 tokens, the cached run generates the rest (its one prefill of the
    #    prompt included), the baseline one frame
    model = gpt(6, 6, 384, 2048, on="cpu")
    prompt = random_tokens(257)  # 1 + 1799 tokens in context
    ours = tokens_per_s(model, 35, prompt=prompt)  # context 1800 -> 2045
    base = tokens_per_s(model, 1, prompt=prompt, sampler=fixtures.nocache_frames)
    row("CPU 6L/384 ctx ~2048: KV cache vs full recompute", ours, base, "tokens/s")

    sherlock, tiny = gpt(**config("sherlock")), gpt(**config("tiny"))
    label = "sherlock 8L/512/ctx2048"
    if not cuda:
        # 2. batch 1 streams every weight once per token: its floor is (bytes of weights) / (bandwidth of a
        #    matrix-vector product), here measured on a 128 MiB float32 matrix
        w, x = torch.randn(65536, 512), torch.randn(1, 512)
        n_bytes = sum(p.numel() * p.element_size() for p in sherlock.parameters())
        n_bytes -= sherlock.transformer.wpe.weight.numel() * 4  # one row of the position table is read per token

        def streaming_bound() -> float:
            """tokens/s; measured again beside each figure compared to it: this VM's bandwidth drifts by 25%"""
            return w.numel() * 4 / timeit(lambda: F.linear(x, w), repeat=10) / n_bytes
        bound = streaming_bound()
        bandwidth = bound * n_bytes
        print(f"weight-streaming bound: {n_bytes / 1e6:.0f} MB of weights / {bandwidth / 1e9:.1f} GB/s (128 MiB "
              f"float32 matvec) = {bound:.0f} tokens/s; a step reads {(n_bytes - 8192 * 512 * 4) / 1e6:.0f} MB "
              "(lm_head rows of the sampled level only)", flush=True)
        # the ceiling of any eager step: the step's own matrix-vector products (every block's four, lm_head's rows
        # of one level) back to back, nothing between them. Measured on a 2-core VM: they stream at ~25 GB/s, not
        # the 128 MiB matvec's ~35 (each call pays a ramp-up), and every op between them runs on caches the weights
        # just flushed (a 3 us layer_norm then takes ~40 us)
        lins = [m.weight for m in sherlock.modules() if isinstance(m, torch.nn.Linear) and m is not sherlock.lm_head]
        lins.append(sherlock.lm_head.weight[:layout.codebook_size])
        xs = [torch.randn(1, w.shape[1]) for w in lins]
        matvecs = timeit(lambda: [F.linear(x, w) for x, w in zip(xs, lins)], repeat=10)
        row(f"CPU {label} B=1: the step's matvecs alone vs weight-streaming bound", 1 / matvecs, bound, "steps/s")
        n_frames = round(3 * real_time / fs)  # 3 s of audio
        # decode="compile": the one-token step compiled to C++ (sampling.compiled_token_step); its first run compiles
        t0 = time.perf_counter()
        sampling.generate_tokens(sherlock, layout, None, 2, decode="compile")
        print(f"CPU {label} decode=compile: first run (compile included) {time.perf_counter() - t0:.1f} s",
              flush=True)
        for _ in range(2):  # interleaved with eager, each beside the bound measured just before it
            bound = streaming_bound()
            compiled = tokens_per_s(sherlock, n_frames, repeat=3, decode="compile")
            row(f"CPU {label} B=1 compile LM 3s vs weight-streaming bound", compiled, bound, "tokens/s")
            bound = streaming_bound()
            eager = tokens_per_s(sherlock, n_frames, repeat=3)
            row(f"CPU {label} B=1 eager LM 3s vs weight-streaming bound", eager, bound, "tokens/s")
            row(f"CPU {label} B=1 compile vs eager LM 3s", compiled, eager, "tokens/s")
        row(f"CPU {label} B=1 compile LM 3s vs real time", compiled, real_time, "tokens/s")
        for b in (1, 4):
            tps = tokens_per_s(sherlock, n_frames, b, repeat=3)
            if b == 1:
                row(f"CPU {label} B=1 LM 3s vs weight-streaming bound", tps, streaming_bound(), "tokens/s")
            row(f"CPU {label} B={b} LM 3s vs real time", tps, real_time, "tokens/s")
            row(f"CPU {label} B={b} LM 3s vs the loop before", tps, before_per_s(sherlock, n_frames, b, repeat=3),
                "tokens/s")
        for b in (1, 4):
            n_frames = round(3 * real_time / fs)  # 245 tokens: the loop before cannot slide past block_size 256
            row(f"CPU tiny 2L/64/ctx256 B={b} LM 3s vs the loop before", tokens_per_s(tiny, n_frames, b, repeat=3),
                before_per_s(tiny, n_frames, b, repeat=3), "tokens/s")
        # 3. a long run slides the window: each slide re-prefills the kept ~3/4 of block_size, then ~1/4 block_size
        #    tokens follow, attending over 1.5k-2k cached keys (a 3 s run attends over < 250). Against decoding at
        #    the same context without any slide: a kept window as the prompt, its one prefill timed apart and left out
        n_long = round(60 * real_time / fs)
        t0 = time.perf_counter()
        sampling.generate_tokens(sherlock, layout, None, n_long, generator=torch.Generator().manual_seed(0))
        long_s = time.perf_counter() - t0
        block = sherlock.config.block_size
        keep = sampling.keep_frames(layout, block) * fs
        n, slides = 1, 0  # sample_frames' rule: slide at a frame start when the next frame would not fit
        for _ in range(n_long):
            if n + fs - 1 > block:
                n, slides = keep, slides + 1
            n += fs
        prompt = random_tokens(keep // fs)
        n_window = (block - 1 - keep) // fs  # frames after it, up to the next slide
        t_window = timeit(lambda: sampling.generate_tokens(sherlock, layout, prompt, n_window,
                                                           generator=torch.Generator().manual_seed(0)), repeat=1)

        def prefill() -> None:
            with torch.no_grad(), sampling.decode_context("cpu"):
                sherlock(torch.cat([torch.as_tensor(layout.audio_context()), prompt])[None],
                         kv_cache=sherlock.new_kv_cache(1))
        t_prefill = timeit(prefill, repeat=2)
        row(f"CPU {label} B=1 LM 60s ({slides} slides) vs same context, no slide", n_long * fs / long_s,
            n_window * fs / (t_window - t_prefill), "tokens/s")
        print(f"  each slide re-prefills {keep} tokens in {t_prefill:.2f} s: {slides} slides = "
              f"{slides * t_prefill / long_s:.1%} of the 60 s run", flush=True)
    else:
        # 2. per decode mode at batch 1, beside the loop before this issue (2 s: it is slow) and real time
        n_frames = round(10 * real_time / fs)
        before = before_per_s(sherlock, round(2 * real_time / fs))
        print(f"[{card}] {label} B=1, the loop before (default attention dispatch): {before:.1f} tokens/s",
              flush=True)
        per_mode = {}
        for decode in ("eager", "static", "graph", "compile"):
            try:
                t0 = time.perf_counter()
                tps = per_mode[decode] = tokens_per_s(sherlock, n_frames, decode=decode)
                warm = time.perf_counter() - t0 - n_frames * fs / tps  # the warm-up run: capture or compile
            except Exception as e:  # a compile that fails on this machine must not hide the other figures
                print(f"[{card}] decode={decode} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row(f"[{card}] {label} B=1 {decode} vs the loop before", tps, before, "tokens/s")
            row(f"[{card}] {label} B=1 {decode} vs real time", tps, real_time, "tokens/s")
            print(f"[{card}]   decode={decode}: first run (warm-up, capture/compile included) {warm:.2f} s",
                  flush=True)
        # inductor's kernels in the frame graph against the eager kernels in it
        if "compile" in per_mode and "graph" in per_mode:
            row(f"[{card}] {label} B=1 compile vs graph", per_mode["compile"], per_mode["graph"], "tokens/s")
        for decode in [d for d in ("eager", "graph", "compile") if d in per_mode]:
            row(f"[{card}] {label} B=64 {decode} LM 10s vs real time", tokens_per_s(sherlock, n_frames, 64,
                                                                                     decode=decode),
                real_time, "tokens/s")
        bench_attention_backends(sherlock, card)
    tiny_frames = round(10 * real_time / fs)
    for b in (1, 4):
        row(f"[{card}] tiny 2L/64/ctx256 B={b} LM 10s vs real time", tokens_per_s(tiny, tiny_frames, b), real_time,
            "tokens/s")

    # 4. the codec: a random-weight SNAC with the real 24 kHz config, one pass vs streamed in 1 s chunks
    with tempfile.TemporaryDirectory() as d:
        codec_dir = save_random_snac(os.path.join(d, "codec"), SNAC_24KHZ_CONFIG)
        tok = load_codec(codec_dir, device=device)
        seconds, n = 5.0, round(5.0 * real_time / fs)
        tokens = random_tokens(n, seed=1)[None].to(device)  # (1, n * fs)
        codes = layout.tokens_to_codes(tokens)

        def one_pass() -> None:
            tok.decode_codes(codes)
            sync()
        t_one = timeit(one_pass, repeat=1)
        row(f"[{card}] codec one-pass decode {seconds:.0f}s (audio s per s)", n * 2048 / 24000 / t_one, 1.0, "x")

        def streamed() -> None:
            dec = sampling.StreamDecoder(tok, 12)
            for f in tokens.split(fs, dim=1):
                dec.push(f)
            dec.flush()
            sync()
        t_stream = timeit(streamed, repeat=1)
        row(f"[{card}] codec streamed decode {seconds:.0f}s, 12-frame chunks", n * 2048 / 24000 / t_stream, 1.0,
            "x")
        if not cuda:
            return

        # 5. generate.py --stream on the sherlock config: time to first audio after loading, and the real-time
        #    factor, in a fresh process (first kernel loads and graph captures are paid there)
        ckpt = os.path.join(d, "ckpt.pt")
        save_checkpoint(ckpt, {"model": gpt(**config("sherlock"), on="cpu").state_dict(),
                               "model_args": vars(sherlock.config), "meta": {**tok.meta(), "codec": codec_dir}})
        r = subprocess.run([sys.executable, os.path.join(here, "generate.py"), f"--ckpt={ckpt}", "--stream",
                            "--num_samples=1", "--seconds=10", f"--out_dir={os.path.join(d, 'out')}"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in r.stdout.splitlines() if "time to first audio" in ln] or [r.stderr.strip()[-500:]]
        print(f"[{card}] generate.py --stream, {label} B=1 10 s: {lines[0]}", flush=True)

        # 6. ten minutes streamed at batch 1 (many slides): speed per minute and memory stay flat
        bench_long_stream(sherlock, tok, card)


def bench_attention_backends(model, card: str) -> None:
    """CUDA: SDPA's default dispatch against the backends sampling.decode_context() allows, for one decode step at
    a full 2048-token cache (the dynamic-shape eager step) and for a training step of the same model (bf16
    autocast, batch 8 x block_size, forward + backward)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import sampling
    c = model.config

    def ms(fn, n: int = 20) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1000

    cache = model.new_kv_cache(1)
    idx = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    lengths = iter(range(c.block_size // 2, c.block_size))

    def decode_step() -> None:  # one key longer at every step, as in sampling
        cache.pos = next(lengths)
        with torch.no_grad():
            model(idx, kv_cache=cache)
    default = ms(decode_step)
    with sampling.decode_context("cuda"):
        chosen = ms(decode_step)
    row(f"[{card}] eager decode step, cache ~{c.block_size // 2}: chosen vs default attention", chosen, default,
        "ms", higher_is_better=False)

    raw = type(model)(c).cuda().train()  # float32 weights under bf16 autocast, as train.py trains
    x = torch.randint(0, 4096, (8, c.block_size), device="cuda")

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = raw(x, x)
        loss.backward()
    default = ms(train_step, 10)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                t = ms(train_step, 10)
        except RuntimeError as e:  # a backend this card or build lacks
            print(f"[{card}] training step with {name} attention: unavailable ({str(e)[:100]})", flush=True)
            continue
        row(f"[{card}] training step B=8x{c.block_size} bf16: {name} vs default", t, default, "ms",
            higher_is_better=False)


def bench_long_stream(model, tok, card: str) -> None:
    """CUDA: 10 minutes of audio at batch 1, sampled and stream-decoded: tokens/s of each minute (the window
    slides ~90 times) and allocated GPU memory after each minute."""
    import torch
    import sampling
    layout = tok.layout
    per_minute = round(60 * tok.sample_rate / tok.frame_hop)  # frames
    dec = sampling.StreamDecoder(tok, 12)
    speeds, mem = [], []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g = torch.Generator(device="cuda").manual_seed(0)
    for i, frame in enumerate(sampling.sample_frames(model, layout, None, 10 * per_minute, generator=g), 1):
        dec.push(frame)
        if i % per_minute == 0:
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            speeds.append(per_minute * layout.frame_size / (t1 - t0))
            mem.append(torch.cuda.memory_allocated() / 2**20)
            t0 = t1
    dec.flush()
    print(f"[{card}] 10 min streamed, B=1 graph + codec: tokens/s per minute "
          f"{' '.join(f'{s:.0f}' for s in speeds)}; allocated MiB per minute {' '.join(f'{m:.0f}' for m in mem)}",
          flush=True)
    row(f"[{card}] 10 min stream: last minute vs first, tokens/s", speeds[-1], speeds[0], "tokens/s")
    row(f"[{card}] 10 min stream: allocated after 10 min vs 1 min", mem[-1], mem[0], "MiB", higher_is_better=False)


# --- watch --------------------------------------------------------------------
def bench_watch() -> None:
    """What watching a run costs: train.py's eval samples (2 x 5 s, as by default) and report.html rebuild, against
    the training of configs/sherlock.py's default schedule (2500 iterations of 65k tokens, an eval every 100).
    Runs train.py itself with the sherlock config on random tokens and a random-weight SNAC 24 kHz. On CUDA that is
    the real loop (compile, bf16/fp16); on a CPU the iterations are 1 window of 2048 tokens, scaled up to 65k (an
    estimate: the CPU is compute-bound in training and samples far faster relative to it than a GPU does)."""
    import json
    import os
    import subprocess
    import tempfile
    import numpy as np
    import torch
    import report
    from common import read_config_file
    from tokenizer import Layout
    root = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(root, "tests"))
    from conftest import SNAC_24KHZ_CONFIG, save_random_snac

    cuda = torch.cuda.is_available()
    cfg = read_config_file(os.path.join(root, "configs", "sherlock.py"))
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
    layout = Layout((4, 2, 1), 4096)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        rng = np.random.default_rng(0)
        shards = []
        for split, n in (("train", 2_000_000), ("val", 400_000)):
            rng.integers(0, layout.vocab_size, n, dtype=np.uint16).tofile(os.path.join(data, f"{split}_000.bin"))
            shards.append({"file": f"{split}_000.bin", "split": split, "tokens": n, "sources": []})
        meta = {"codec": save_random_snac(os.path.join(tmp, "snac"), SNAC_24KHZ_CONFIG), "sample_rate": 24000,
                "frame_hop": 2048, "tokens_per_second": 24000 / 2048 * 7, **layout.meta(), "dtype": "uint16",
                "dataset": "bench", "shards": shards, "skipped": [], "splits": {}}
        with open(os.path.join(data, "meta.json"), "w") as f:
            json.dump(meta, f)
        out = os.path.join(tmp, "out")
        # 3 evals: the first and the last always sample (the first also loads the codec), the middle one if the
        # time budget allows
        args = ["--max_iters=40", "--eval_interval=20", "--log_interval=5"] if cuda else \
            ["--max_iters=4", "--eval_interval=2", "--log_interval=1", "--batch_size=1",
             "--gradient_accumulation_steps=1", "--eval_iters=1", "--device=cpu", "--compile=False"]
        r = subprocess.run([sys.executable, os.path.join(root, "train.py"), os.path.join(root, "configs/sherlock.py"),
                            f"--data_dir={data}", f"--out_dir={out}"] + args, cwd=root, capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(f"error: train.py failed: {r.stderr}")
        rows = report.read_log(os.path.join(out, "log.jsonl"))
        t0 = time.perf_counter()
        report.build_report(out, meta)
        t_report = time.perf_counter() - t0
    train = [x for x in rows if "ms" in x][2:]  # past compile and warm-up
    ms = float(np.median([x["ms"] for x in train])) * (1 if cuda else tokens_per_iter / (cfg["block_size"]))
    samples = [x["sample_s"] for x in rows if "sample_s" in x]
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device}; sherlock iteration {ms / 1e3:.3g} s" + ("" if cuda else " (1 window x 32, estimated)")
          + f"; samples {', '.join(f'{s:.2f}' for s in samples)} s (the first loads the codec); report "
          f"{t_report:.2f} s", flush=True)
    interval = cfg["eval_interval"] * ms / 1e3  # training time between two evals
    row("eval samples (2 x 5 s) per eval vs 100 iterations", samples[-1], interval, "s", higher_is_better=False)
    row("report.html rebuild per eval vs 100 iterations", t_report, interval, "s", higher_is_better=False)
    n_evals = cfg["max_iters"] // cfg["eval_interval"] + 1
    run_s = cfg["max_iters"] * ms / 1e3
    every = samples[0] + (n_evals - 1) * samples[-1]
    print(f"sherlock schedule: training {run_s / 60:.1f} min; samples at all {n_evals} evals {every:.0f} s = "
          f"{100 * every / run_s:.1f}% (capped at {100 * report.SAMPLE_SHARE:.0f}% by skipping evals), report "
          f"{n_evals * t_report:.0f} s = {100 * n_evals * t_report / run_s:.1f}%", flush=True)


PARTS = {"tokenizer": bench_tokenizer, "prepare": bench_prepare, "train": bench_train, "generate": bench_generate,
         "watch": bench_watch}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PARTS)
    for name in names:
        if name not in PARTS:
            raise SystemExit(f"error: unknown benchmark '{name}' (choose from {', '.join(PARTS)})")
        print(f"== {name} ==", flush=True)
        PARTS[name]()
