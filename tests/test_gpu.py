"""Checks that need a CUDA GPU; each skips itself without one. On any CUDA machine:

    python -m pytest -q tests/test_gpu.py

Sampling: the captured CUDA-graph step gives the eager step's tokens, bf16 generation decodes to WAV, and no decode
step runs cuDNN attention. Training: bf16 + compile, fp16 + GradScaler, and resume, through train.py; FSDP with
activation checkpointing and compile, and GPT-2 XL on one GPU within 10% of its memory plan. Eval samples
leave training's RNG alone. Timings are in bench.py (`python bench.py generate`, `python bench.py watch`).
"""
import subprocess
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_script, tiny_gpt
from test_train import read_log, write_dataset

import fixtures
import sampling
from checkpoints import save_checkpoint
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -----------------------------------------------------------------------------
# eval samples on the GPU leave training's CUDA RNG alone and decode on the device

def test_eval_samples_on_cuda_leave_the_cuda_rng_alone(codec_dir, tmp_path):
    import report
    from codec import load_codec
    from samples import EvalSamples
    meta = load_codec(codec_dir).meta()
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=256, n_layer=2, n_head=2, n_embd=64,
                          dropout=0.1)).cuda()
    samples = EvalSamples(str(tmp_path), meta, 2, 1.0, "cuda", seed=1)
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    row = samples(model, 0)
    assert row["sample_s"] > 0 and model.training
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(cuda, torch.cuda.get_rng_state())
    assert len(report.list_samples(str(tmp_path))[0]) == 2
    print(f"2 x 1 s eval samples on {torch.cuda.get_device_name()}: {row['sample_s']:.2f} s (codec load included)")


# -----------------------------------------------------------------------------
# sampling on CUDA

def cuda_gpt(layout, dtype=torch.float32, block_size: int = 64, seed: int = 0) -> GPT:
    return tiny_gpt(layout.vocab_size, block_size, seed, n_embd=64).to("cuda", dtype)


def tokens(model, layout, decode: str, prompt=None, temperature: float = 0.0, seed: int = 0, **kw) -> torch.Tensor:
    """decode="nocache": nanoGPT's full recompute (fixtures.nocache_frames)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(sampler=fixtures.nocache_frames, **kw) if decode == "nocache" else dict(decode=decode, **kw)
    return sampling.generate_tokens(model, layout, prompt, 25, num_samples=3, temperature=temperature, generator=g,
                                    **kw).cpu()


def test_graph_greedy_tokens_equal_eager(tok):
    layout = tok.layout
    prompt = torch.randint(0, layout.codebook_size, (4, layout.frame_size))
    prompt = (prompt + torch.from_numpy(layout.frame_levels * layout.codebook_size)).reshape(-1)
    for p in (None, prompt):  # 25 frames through a 64-token context: several slides and re-prefills
        model = cuda_gpt(layout)
        graph = tokens(model, layout, "graph", p)
        assert torch.equal(graph, tokens(model, layout, "static", p))  # the same kernels, replayed
        assert torch.equal(graph, tokens(model, layout, "eager", p))  # other attention kernels, float32
        assert torch.equal(graph, tokens(model, layout, "nocache", p))  # nanoGPT's recompute
        for dtype in (torch.bfloat16, torch.float16):  # float16: what generate.py picks on a T4 or a V100
            half = cuda_gpt(layout, dtype)
            assert torch.equal(tokens(half, layout, "graph", p), tokens(half, layout, "static", p)), dtype


def test_graph_same_seed_same_tokens(tok):
    layout, model = tok.layout, cuda_gpt(tok.layout, torch.bfloat16)
    knobs = dict(temperature=0.9, top_k=200, top_p=0.95)
    a, b, c = (tokens(model, layout, "graph", seed=s, **knobs) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, tokens(model, layout, "static", seed=1, **knobs))  # the same random draws, in order
    layout.tokens_to_codes(a)  # frame-valid: raises otherwise


def test_compile_steps_for_two_batch_sizes_equal_static(tok):
    """decode="compile": inductor's step captured in the frame graphs (one per attention length) gives the eager
    static frame's greedy tokens, for two batch sizes, one compile each whatever the frame position and length (as
    test_compiled_static_frame_matches_static counts on the CPU, where the text+audio layout has two)."""
    from torch._dynamo.utils import counters
    layout, model = tok.layout, cuda_gpt(tok.layout)
    graphs = counters["stats"]["unique_graphs"]
    for b in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(0)
        compiled = sampling.generate_tokens(model, layout, None, 12, num_samples=b, temperature=0.0, generator=g,
                                            decode="compile").cpu()
        static = sampling.generate_tokens(model, layout, None, 12, num_samples=b, temperature=0.0,
                                          decode="static").cpu()
        assert torch.equal(compiled, static), b
    assert counters["stats"]["unique_graphs"] - graphs == 2
    # sampled: the frame's noise reaches the compiled step through its own buffer, copied inside the graph
    knobs = dict(temperature=1.0, top_k=200, top_p=0.9)
    compiled = tokens(model, layout, "compile", seed=3, **knobs)
    assert torch.equal(compiled, tokens(model, layout, "static", seed=3, **knobs))
    bf16 = cuda_gpt(layout, torch.bfloat16)  # inductor's bfloat16 rounds apart from eager's: same seed, same tokens
    a, b = (tokens(bf16, layout, "compile", seed=3, **knobs) for _ in range(2))
    assert torch.equal(a, b)
    layout.tokens_to_codes(a)  # frame-valid: raises otherwise


def test_no_decode_step_runs_cudnn_attention(tok):
    """cuDNN attention re-plans for every key length on Hopper (sampling.decode_context); the profiler sees the
    attention op of every step (eager), of the captures (graph), and of the prefills."""
    from torch.profiler import ProfilerActivity, profile
    layout = tok.layout
    for decode in ("eager", "graph"):
        model = cuda_gpt(layout, torch.bfloat16, block_size=128, seed=1)  # a new model: its capture is profiled
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            tokens(model, layout, decode, temperature=1.0)
        names = [e.name.lower() for e in prof.events()]
        assert any("efficient_attention" in n or "flash_attention" in n for n in names), decode  # the control
        assert not [n for n in names if "cudnn" in n], (decode, sorted({n for n in names if "cudnn" in n}))
    # and the profiler does name cuDNN attention when it runs (where this card and build have it)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
    except RuntimeError:  # no cuDNN attention here
        return
    assert any("cudnn" in e.name.lower() for e in prof.events())


def test_bf16_generation_decodes(tok, codec_dir, tmp_path):
    """generate.py on CUDA (bf16 weights, graph steps, the codec on the GPU) writes WAVs of the requested length
    and reports its time to first audio."""
    model = cuda_gpt(tok.layout, block_size=128)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, {"model": model.cpu().state_dict(), "model_args": asdict(model.config),
                           "meta": {**tok.meta(), "codec": codec_dir}})
    r = run_script("generate.py", f"--ckpt={ckpt}", "--device=cuda", "--dtype=bfloat16", "--num_samples=2",
                   "--seconds=3", "--stream", f"--out_dir={tmp_path}", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "time to first audio" in r.stdout, r.stdout
    for i in range(2):
        audio, sr = sf.read(tmp_path / f"sample_{i}.wav", dtype="float32")
        assert sr == 24000 and len(audio) == 36 * 2048 and np.isfinite(audio).all()  # ceil(3 s / 85.3 ms) frames
        assert audio.std() > 0


# -----------------------------------------------------------------------------
# training on CUDA, through train.py

CUDA_TINY = ["--device=cuda", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4",
             "--dropout=0.0", "--learning_rate=3e-3", "--warmup_iters=2", "--eval_iters=2", "--log_interval=1",
             "--gradient_accumulation_steps=2"]


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return run_script("train.py", *CUDA_TINY, *args, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), train_tokens=[20_000], val_tokens=[2_000])


@pytest.mark.parametrize("dtype,compile", [("bfloat16", True), ("float16", False)])
def test_training_runs_and_learns(data, tmp_path, dtype, compile):
    r = run_train([f"--data_dir={data}", f"--dtype={dtype}", f"--compile={compile}", "--max_iters=30",
                   "--eval_interval=30", f"--out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    assert f"dtype {dtype}" in r.stdout, r.stdout
    losses = [row["loss"] for row in read_log(str(tmp_path)) if "loss" in row]
    assert len(losses) == 30 and np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert bool(ckpt["scaler"]) == (dtype == "float16")  # a GradScaler only where float16 needs it


def test_resume_continues_the_run(data, tmp_path):
    """bf16, stopped at 6 and resumed to 12: the losses of a run straight to 12 (to GPU float noise)."""
    args = [f"--data_dir={data}", "--dtype=bfloat16", "--compile=False", "--eval_interval=3", "--lr_decay_iters=12"]
    full = run_train(args + ["--max_iters=12", f"--out_dir={tmp_path}/full"])
    half = run_train(args + ["--max_iters=6", f"--out_dir={tmp_path}/half"])
    assert full.returncode == 0 and half.returncode == 0, full.stderr + half.stderr
    rest = run_train(args + ["--max_iters=12", f"--out_dir={tmp_path}/half", "--init_from=resume"])
    assert rest.returncode == 0, rest.stderr
    a = [row["loss"] for row in read_log(f"{tmp_path}/full") if "loss" in row]
    b = [row["loss"] for row in read_log(f"{tmp_path}/half") if "loss" in row]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=2e-2)


def test_fsdp_with_checkpointing_and_compile_trains_like_ddp_and_resumes(data, tmp_path):
    """bf16: FSDP's one-rank group with activation checkpointing and per-Block compile logs the losses of the plain
    compiled run (to bf16 noise), and its sharded checkpoint resumes."""
    args = [f"--data_dir={data}", "--dtype=bfloat16", "--compile=True", "--eval_interval=3", "--lr_decay_iters=12"]
    plain = run_train(args + ["--max_iters=12", f"--out_dir={tmp_path}/plain"])
    sharded = args + ["--fsdp=True", "--activation_checkpointing=True"]
    half = run_train(sharded + ["--max_iters=6", f"--out_dir={tmp_path}/fsdp"])
    assert plain.returncode == 0 and half.returncode == 0, plain.stderr + half.stderr
    rest = run_train(sharded + ["--max_iters=12", f"--out_dir={tmp_path}/fsdp", "--init_from=resume"])
    assert rest.returncode == 0, rest.stderr
    a = [row["loss"] for row in read_log(f"{tmp_path}/plain") if "loss" in row]
    b = [row["loss"] for row in read_log(f"{tmp_path}/fsdp") if "loss" in row]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=2e-2)
    assert (tmp_path / "fsdp" / "ckpt" / "state.pt").is_file()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 60e9,
                    reason="GPT-2 XL with FSDP + activation checkpointing plans ~35 GB at batch 8")
def test_gpt2_xl_trains_on_one_gpu_within_the_memory_plan(tmp_path):
    import re
    data = write_dataset(str(tmp_path / "data"), train_tokens=[40_000], val_tokens=[4_000])
    r = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path}/xl", "--n_layer=48", "--n_head=25",
                   "--n_embd=1600", "--block_size=1024", "--batch_size=8", "--gradient_accumulation_steps=1",
                   "--fsdp=True", "--activation_checkpointing=True", "--max_iters=4", "--eval_interval=4",
                   "--eval_iters=1", "--eval_samples=0", "--log_interval=1", timeout=900)
    assert r.returncode == 0, r.stderr
    peak, planned = (float(x) for x in re.search(r"peak memory ([\d.]+) GB \(planned ([\d.]+) GB\)",
                                                  r.stdout).groups())
    print(f"GPT-2 XL shape, FSDP + checkpointing, 8 x 1024 on {torch.cuda.get_device_name()}: peak {peak} GB, "
          f"planned {planned} GB; {r.stdout.strip().splitlines()[-2]}")
    assert abs(peak - planned) <= 0.1 * planned, (peak, planned)


def test_text_audio_layout_graph_equals_static():
    """The text+audio layout's captured steps (a frame start samples level 0 + AUDIO_END under the grammar's mask;
    ended rows repeat AUDIO_END) give the static step's tokens, greedy and sampled."""
    from tokenizer import Layout
    layout = Layout((4, 2, 1), 4096, "gpt2o_test", 300)
    model = cuda_gpt(layout)
    with torch.no_grad():
        model.lm_head.weight[layout.special("audio_end")] += 8.0 * torch.randn(model.config.n_embd, device="cuda")
    # sampled with top-k and top-p: a frame start sorts its 12k-id row inside the capture (a sort that long takes
    # another kernel than the 4096-id level rows)
    knobs = dict(temperature=1.0, top_k=5000, top_p=0.9)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        for kw in (dict(temperature=0.0), knobs):
            graph = tokens(model, layout, "graph", **kw)
            assert torch.equal(graph, tokens(model, layout, "static", **kw)), (dtype, kw)
    model = model.float()
    assert torch.equal(tokens(model, layout, "compile", **knobs), tokens(model, layout, "static", **knobs))


# -----------------------------------------------------------------------------
# data prep on the GPU

def test_codes_come_back_while_the_next_files_encode(codec_dir):
    """prepare_audio.py's hand-off (tok.codes_to_host): a group's codes are copied to the host behind its own codec
    calls and read after the next group's calls are queued; they are the codes a plain .cpu() gives, and reading
    them waits for those copies but not for the work queued after them."""
    from conftest import synth_audio
    from codec import load_codec
    tok = load_codec(codec_dir, "cuda")
    clips = [tok.to_mono(synth_audio(seconds, 24000, seed=seed), 24000) for seed, seconds in ((1, 30.0), (2, 20.0))]
    big = [tok.to_mono(synth_audio(180.0, 24000, seed=3), 24000)]
    first = tok.encode_many(clips, chunk_seconds=10, batch_seconds=20)
    torch.cuda._sleep(2 ** 27)  # the GPU busy for a while first: the copies cannot have landed unless waited for
    wait = tok.codes_to_host(first)
    tok.encode_many(big, chunk_seconds=60)  # the next group
    torch.cuda._sleep(2 ** 30)  # ~0.5 s more, queued after the copies
    got = wait()
    assert not torch.cuda.current_stream().query()  # the work queued after the copies is still running
    for codes, host in zip(first, got):
        assert all(np.array_equal(c.cpu().numpy(), h) for c, h in zip(codes, host))
        assert any(len(np.unique(h)) > 1 for h in host)  # codes, not a buffer that happens to match


# -----------------------------------------------------------------------------
# transformers on CUDA: an export's logits, and FrameValidLogits with the scores on the GPU

def test_export_on_cuda_matches_and_generates_frame_valid_ids(tmp_path):
    import json
    import safetensors.torch
    transformers = pytest.importorskip("transformers")
    from conftest import TEXT_ENCODING
    from hf import FrameValidLogits, export_files
    from tokenizer import Layout, load_text_encoding
    layout = Layout((4, 2, 1), 4096, TEXT_ENCODING, load_text_encoding(TEXT_ENCODING).n_vocab)
    ours = tiny_gpt(layout.vocab_size, block_size=128, n_embd=64)
    tensors, config, generation = export_files(ours.state_dict(), asdict(ours.config), layout.meta())
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).cuda().eval()
    ours = ours.cuda()
    ids = torch.randint(0, layout.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids, ids)[0][..., :layout.vocab_size]).abs().max()
    assert diff <= 1e-4, diff  # TF32 may differ between the two kernels' orders; float32 matmuls here
    context = torch.as_tensor(layout.audio_context(), device="cuda")[None].repeat(4, 1)
    out = theirs.generate(context, max_new_tokens=10 * layout.frame_size,
                          logits_processor=transformers.LogitsProcessorList([FrameValidLogits(layout.meta())]))
    end = layout.special("audio_end")
    for row in out[:, context.shape[1]:].cpu():
        row = row[:int((row == end).nonzero()[0])] if (row == end).any() else row
        layout.tokens_to_codes(row)  # raises unless whole frames of the right levels


# -----------------------------------------------------------------------------
# continuous batching: a CUDA graph per batch-size bucket, each row as the request alone

def test_batched_graph_rows_equal_each_request_alone(tok):
    from batching import Scheduler, Stream, buckets
    layout = tok.layout
    model = cuda_gpt(layout, block_size=128)
    sched = Scheduler(model, layout, max_batch=4)
    sched.warm_up()
    assert set(sched.graphs) == {(b, n) for b in buckets(4) for n in sched.lengths}
    contexts = [torch.cat([torch.as_tensor(layout.audio_context()),
                           torch.as_tensor(layout.frame_lo).repeat(k) + 7 * k]) for k in range(3)]
    outs = [[] for _ in contexts]
    knobs = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.9, 40, 0.95)]
    for k, c in enumerate(contexts):  # joining one step apart: buckets 1, 2 and 4 all run
        sched.submit(Stream(c, 30, outs[k].append, *knobs[k], seed=k))
        sched.admit()
        sched.step()
    while sched.active:
        sched.step()
    for k, c in enumerate(contexts):
        gen = torch.Generator(device="cuda").manual_seed(k)
        want = torch.cat(list(sampling.sample_frames(model, layout, None, 30, temperature=knobs[k][0],
                                                     top_k=knobs[k][1], top_p=knobs[k][2], generator=gen,
                                                     context=c, decode="static")))
        got = torch.stack(outs[k][:-1]).to(want.device)
        assert outs[k][-1] is None and torch.equal(got, want), k

# eval_tts.py on CUDA: the model in bf16, the ASR and SV models on the GPU

def test_eval_tts_on_cuda(text_tok, codec_dir, tmp_path):
    import json
    model = tiny_gpt(text_tok.layout.vocab_size, 192)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": asdict(model.config),
                           "meta": {**text_tok.meta(), "codec": codec_dir}, "iter_num": 0})
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "a.wav", fixtures.synth_audio(1.0, 16000), 16000)
    (tmp_path / "meta.lst").write_text("a|A prompt.|wavs/a.wav|The birch canoe slid.\n")
    asr = fixtures.save_tiny_whisper(str(tmp_path / "asr"))
    sv = fixtures.save_tiny_wavlm_sv(str(tmp_path / "sv"))
    run_script("eval_tts.py", f"--ckpt={ckpt}", f"--list={tmp_path}/meta.lst", f"--out_dir={tmp_path}/eval",
               f"--asr={asr}", f"--sv={sv}", "--max_seconds=1", "--device=cuda", "--transcribe=True",
               env={"HF_HUB_OFFLINE": "1"}, check=True)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["models"]["device"] == "cuda" and report["config"]["dtype"] == "auto"
    row = report["rows"][0]
    assert row["wer"] >= 0 and -1 <= row["sim"] <= 1 and row["ceiling"]["wer"] >= 0 and "model_asr" in row
    print(f"eval_tts.py on {torch.cuda.get_device_name()}: {report['rows_per_minute']:.1f} rows/min")
