"""generate.py: frame-valid sampling, KV cache vs full recompute, sliding window, prompts, streaming, bad input."""
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, SNAC_24KHZ_CONFIG, assert_one_line_error, run_script, save_random_snac, synth_audio, tiny_gpt

import fixtures
import generate
import sampling
from checkpoints import save_checkpoint

BLOCK_SIZE = 64  # 9 frames of 7 tokens: every test that generates more than that slides the window


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt(tok.layout.vocab_size, BLOCK_SIZE)


@pytest.fixture(scope="module")
def quiet_codec_dir(tmp_path_factory) -> str:
    """The 24 kHz SNAC without its decoder noise, so two decodes of the same tokens can be compared."""
    return save_random_snac(str(tmp_path_factory.mktemp("snac_quiet")), {**SNAC_24KHZ_CONFIG, "noise": False})


@pytest.fixture(scope="module")
def quiet_tok(quiet_codec_dir):
    from codec import load_codec
    return load_codec(quiet_codec_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok, model, quiet_codec_dir) -> str:
    """A checkpoint as train.py writes it; its meta names the noise-free codec folder."""
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_args": asdict(model.config),
                           "meta": {**tok.meta(), "codec": quiet_codec_dir}, "iter_num": 0})
    return path


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_script("generate.py", *args, env={"HF_HUB_OFFLINE": "1", **env})


def assert_frame_valid(tokens: torch.Tensor, layout, n_frames: int) -> None:
    """Every token is a code of the level its position needs (tokens_to_codes raises otherwise)."""
    assert tokens.shape[-1] == n_frames * layout.frame_size, tokens.shape
    codes = layout.tokens_to_codes(tokens)
    assert codes[0].shape[-1] == n_frames


# -----------------------------------------------------------------------------
# sampling

def test_kv_cache_matches_full_recompute_greedy(model, tok):
    layout = tok.layout
    prompt = torch.from_numpy(tok.encode(synth_audio(0.3, 24000), 24000))  # 4 frames
    for p in (None, prompt):
        # 25 frames = 175 tokens through a 64-token context: several slides of the window
        a = sampling.generate_tokens(model, layout, p, 25, num_samples=2, temperature=0.0)
        b = sampling.generate_tokens(model, layout, p, 25, num_samples=2, temperature=0.0,
                                     sampler=fixtures.nocache_frames)
        c = sampling.generate_tokens(model, layout, p, 25, num_samples=2, temperature=0.0, decode="static")
        assert torch.equal(a, b) and torch.equal(a, c)
        assert_frame_valid(a, layout, 25 + (0 if p is None else len(p) // layout.frame_size))


def test_cache_prefill_logits_match_full_forward(model, tok):
    """One token at a time through the cache gives the logits of a full forward over the same window."""
    x = torch.tensor([[tok.layout.boundary_id, 5, 4096 + 7, 8192 + 1, 8192 + 2, 4096 + 3]])
    cache = model.new_kv_cache(1)
    model(x[:, :3], kv_cache=cache)
    for t in range(3, x.shape[1]):
        step, _ = model(x[:, t:t + 1], kv_cache=cache)
        full, _ = model(x[:, :t + 1])
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_every_sample_decodes_to_requested_frames(model, tok):
    layout = tok.layout
    n_frames = 6  # 0.5 s at 24 kHz
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = sampling.generate_tokens(model, layout, None, n_frames, num_samples=1, temperature=1.5, generator=g)
        assert_frame_valid(out, layout, n_frames)
        assert not (out == layout.boundary_id).any()
        if seed < 2:  # decoding is the slow part; the token check above is what decides decodability
            assert len(tok.decode(out[0].numpy())) == n_frames * tok.frame_hop


def test_sliding_window_past_block_size(tok):
    layout = tok.layout
    model = tiny_gpt(layout.vocab_size, block_size=3 * layout.frame_size)  # 21 tokens: a slide every few frames
    g = torch.Generator().manual_seed(0)
    frames = list(sampling.sample_frames(model, layout, None, 60, num_samples=3, temperature=1.0, generator=g))
    assert len(frames) == 60 and all(f.shape == (3, layout.frame_size) for f in frames)
    assert_frame_valid(torch.cat(frames, dim=1), layout, 60)
    with pytest.raises(Exception, match="block_size"):  # a context shorter than 2 frames cannot slide by frames
        next(sampling.sample_frames(tiny_gpt(layout.vocab_size, block_size=10), layout, None, 3))


def test_same_seed_same_tokens(model, tok):
    def sample(seed, decode="eager"):
        g = torch.Generator().manual_seed(seed)
        return sampling.generate_tokens(model, tok.layout, None, 12, num_samples=2, temperature=1.0, top_k=50,
                                        top_p=0.9, generator=g, decode=decode)
    a, b, c = sample(1), sample(1), sample(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the static-shape step (what a CUDA graph replays) draws the same random numbers in the same order
    assert torch.equal(a, sample(1, decode="static"))


def test_static_steps_are_reused_but_never_shared(tok):
    """A model's static step (its cache, and on CUDA its graphs) is made once per batch size and reused; two
    generations running at the same time do not share one."""
    layout, model = tok.layout, tiny_gpt(tok.layout.vocab_size)
    greedy = sampling.generate_tokens(model, layout, None, 12, num_samples=2, temperature=0.0)
    a = sampling.sample_frames(model, layout, None, 12, num_samples=2, temperature=0.0, decode="static")
    b = sampling.sample_frames(model, layout, None, 12, num_samples=2, temperature=0.0, decode="static")
    frames = list(zip(a, b))  # interleaved, frame by frame (with slides of the 64-token window)
    assert torch.equal(torch.cat([x for x, _ in frames], dim=1), greedy)
    assert torch.equal(torch.cat([y for _, y in frames], dim=1), greedy)
    steps = sampling._STEPS[model]
    assert len(steps) == 1 and not next(iter(steps.values())).busy  # the first is kept for the next generation
    ranges = [(int(lo), int(lo) + layout.codebook_size, None) for lo in layout.frame_lo]  # audio-only: no AUDIO_END
    step = sampling.static_step(model, 2, (0.0, 0, 1.0), "static", ranges,
                                sampling.Grammar(layout, model.config.vocab_size, "cpu"))
    assert step is next(iter(steps.values()))
    # moved weights (.to(), .half()) make a new step; the old one, whose graphs read the old addresses, goes
    sampling.generate_tokens(model.double(), layout, None, 2, num_samples=2, temperature=0.0, decode="static")
    assert [k[-3] for k in steps] == [model.lm_head.weight.device] and [k[-2] for k in steps] == [torch.float64]


def test_sampling_under_autocast_runs_in_the_weights_dtype(model, tok):
    """nanoGPT's sample.py samples under autocast: every decode path then runs as without it, in the weights' dtype
    (a static step's keys would otherwise be bfloat16 against a float32 cache, and a captured graph would read
    autocast's cast weights after they are freed)."""
    def sample(decode):
        g = torch.Generator().manual_seed(0)
        return sampling.generate_tokens(model, tok.layout, None, 12, num_samples=2, temperature=1.0, generator=g,
                                        decode=decode)
    plain = sample("eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for decode in ("eager", "static"):
            assert torch.equal(sample(decode), plain), decode
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is back between and after generations


def has_a_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def needs_a_cxx_compiler() -> None:
    """torch.compile on a CPU builds C++: skip where there is no compiler at all (CI has one, and must)."""
    if not has_a_cxx_compiler():
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler (g++) for torch.compile")
        pytest.skip("no C++ compiler (apt-get install g++): torch.compile cannot build the CPU decode step")


@pytest.mark.slow
def test_cpu_compiled_step_matches_eager(model, tok):
    """decode="compile" on a CPU: inductor's C++ one-token step (sampler included, attention over the filled cache
    positions as a dynamic size) gives the eager steps' tokens, through slides of the window, in both layouts
    (text+audio: AUDIO_END at frame starts, rows that end; with top-k and top-p). One graph serves every position
    and id range: no recompile for a new generation. (Compiles are slow: the audio-only one is generate.py's
    default settings, which test_stream_cli_matches_one_shot then finds in inductor's disk cache.)"""
    from torch._dynamo.utils import counters
    from tokenizer import Layout
    needs_a_cxx_compiler()

    def sample(m, layout, decode, n_frames, seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return sampling.generate_tokens(m, layout, None, n_frames, generator=g, decode=decode, **kw)

    before = counters["stats"]["unique_graphs"]
    for seed in (0, 1):  # 25 frames = 175 tokens through a 64-token context: several slides
        compiled = sample(model, tok.layout, "compile", 25, seed, num_samples=2, temperature=1.0)
        assert torch.equal(compiled, sample(model, tok.layout, "eager", 25, seed, num_samples=2, temperature=1.0))
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 1  # compiled once (not eager), whatever the position and the frame position
    assert counters["stats"]["unique_graphs"] == graphs  # a new generation, the same graph
    # batch 1, what the compile is for: no activation reaches a matmul as a view that ATen copies first (a (1, 1, C)
    # one viewed as (1, C) got a zero stride; model.py keeps the residual stream 2-D to avoid it)
    sample(model, tok.layout, "compile", 2, 0, num_samples=1, temperature=1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        sample(model, tok.layout, "compile", 12, 0, num_samples=1, temperature=1.0)
    C = model.config.n_embd
    copied = [e.input_shapes[0] for e in prof.events() if e.name == "aten::clone"]
    assert not [shape for shape in copied if shape in ([1, C], [1, 4 * C])]
    graphs = counters["stats"]["unique_graphs"]
    layout = Layout((4, 2, 1), 4096, "gpt2o_test", 300)
    end = layout.special("audio_end")
    text_audio = tiny_gpt(layout.vocab_size)
    with torch.no_grad():
        text_audio.lm_head.weight[end] += 8.0 * torch.randn(text_audio.config.n_embd)  # rows end, at different frames
    kw = dict(num_samples=3, temperature=1.0, top_k=2000, top_p=0.9)
    for seed in (3, 4):
        compiled = sample(text_audio, layout, "compile", 12, seed, **kw)
        assert torch.equal(compiled, sample(text_audio, layout, "eager", 12, seed, **kw))
        assert (compiled.reshape(3, -1, layout.frame_size)[:, :, 0] == end).any()
    # one graph per configuration (model, batch size, sampling knobs) whatever the positions and a full context
    # (the window slid several times), and in the text+audio layout one more for frame starts: their id range (a
    # level + AUDIO_END's) is longer than 4096, where inductor's C++ reductions switch to another accumulator
    assert counters["stats"]["unique_graphs"] == graphs + 2


@pytest.mark.slow
def test_compiled_static_frame_matches_static(tok):
    """decode="compile" on CUDA: inductor's step inside the static frame that a CUDA graph captures (attention over
    the first L cache positions, a mask; text+audio: AUDIO_END's range at frame starts, rows that end). Run here
    without the capture: it gives the eager static frame's tokens, sampled and greedy, at batch 3 and 1, and its
    graphs serve every frame position, position and attention length (two per configuration in the text+audio
    layout, as the CPU step), so a GPU compiles few."""
    from torch._dynamo.utils import counters
    from tokenizer import Layout
    needs_a_cxx_compiler()
    layout = Layout((4, 2, 1), 4096, "gpt2o_test", 300)
    # a width no other test compiles: a compiled graph serves any model of the same shapes, so the count below
    # would depend on which tests ran first
    model, fs, end = tiny_gpt(layout.vocab_size, n_embd=48), layout.frame_size, layout.special("audio_end")
    with torch.no_grad():
        model.lm_head.weight[end] += 8.0 * torch.randn(model.config.n_embd)  # rows end, at different frames
    grammar = sampling.Grammar(layout, model.config.vocab_size, "cpu")
    ranges = [(int(lo), model.config.vocab_size if p == 0 else int(lo) + layout.codebook_size,
               grammar.masks[0, int(lo):] if p == 0 else None) for p, lo in enumerate(layout.frame_lo)]

    def frames(mode: str, knobs: tuple, batch: int, n_frames: int = 8) -> torch.Tensor:
        step = sampling.static_step(model, batch, knobs, mode, ranges, grammar)
        step.tok.fill_(layout.special("audio_start"))
        step.state.zero_()
        g, out = torch.Generator().manual_seed(0), []
        with torch.no_grad():
            for f in range(n_frames):  # the frame step feeds the last token in context at position pos
                step.pos.fill_(f * fs)
                step.noise.uniform_(generator=g)
                ids, state = step(model, f * fs + fs)
                out.append(ids.clone())
                step.tok.copy_(ids[:, -1:])
                step.state.copy_(state)
        return torch.cat(out, dim=1)

    graphs = counters["stats"]["unique_graphs"]
    for knobs, batch in (((1.0, 2000, 0.9), 3), ((0.0, 0, 1.0), 3), ((1.0, 2000, 0.9), 1)):
        compiled = frames("compile", knobs, batch)
        assert torch.equal(compiled, frames("static", knobs, batch)), (knobs, batch)
        if batch == 3:
            assert (compiled.reshape(3, -1, fs)[:, :, 0] == end).any()
    assert counters["stats"]["unique_graphs"] == graphs + 6  # (frame start, the rest) x (two sets of knobs, batch 1)


def test_decode_modes_are_checked(model, tok):
    with pytest.raises(ValueError, match="CUDA"):
        next(sampling.sample_frames(model, tok.layout, None, 1, decode="graph"))  # the model is on the CPU
    with pytest.raises(ValueError, match="decode='fast'"):
        next(sampling.sample_frames(model, tok.layout, None, 1, decode="fast"))


def test_top_k_and_top_p_restrict_to_the_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, float("-inf")]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)

    def sample(temperature, top_k, top_p):
        return sampling.sample_next(logits, temperature, top_k, top_p, torch.rand(logits.shape, generator=g)).flatten()
    assert (sample(1.0, 1, 1.0) == 1).all()
    assert (sample(1.0, 0, 1e-3) == 1).all()
    assert set(sample(5.0, 2, 1.0).tolist()) == {1, 3}
    picks = sample(1.0, 0, 1.0)
    assert set(picks.tolist()) == {0, 1, 2, 3}  # never -inf
    # a draw of exactly 0 gives finite noise: the code of probability 0 still never wins
    assert sampling.sample_next(logits[:1], 1.0, 0, 1.0, torch.zeros(1, 5)).item() == 1
    # the exponential race draws each id with its softmax probability
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    torch.testing.assert_close(freq, torch.softmax(logits[0], dim=0), atol=0.03, rtol=0)


# -----------------------------------------------------------------------------
# prompts

def test_prompt_tokens_are_kept_verbatim(model, tok, tmp_path):
    layout, fs = tok.layout, tok.layout.frame_size
    audio = synth_audio(1.0, 16000, channels=2, seed=3)  # another rate, stereo: load_prompt resamples and downmixes
    path = str(tmp_path / "prompt.flac")
    sf.write(path, audio, 16000)
    mono = tok.to_mono(audio, 16000)
    whole = torch.from_numpy(tok.encode(mono[:len(mono) // 2048 * 2048].numpy(), 24000))
    assert len(whole) == 11 * fs  # 1.0 s is 11.7 frames: the partial last one (half silence) is left out
    assert torch.equal(generate.load_prompt(path, tok, prompt_seconds=0), whole)
    p = generate.load_prompt(path, tok, prompt_seconds=0.5)
    assert len(p) == 6 * fs  # ceil(0.5 s / 85.3 ms) whole frames
    assert torch.equal(p, whole[-6 * fs:])
    # 11 frames (77 tokens) do not fit the 64-token context: the window starts inside the prompt
    for prompt in (p, whole):
        out = sampling.generate_tokens(model, layout, prompt, 5, num_samples=2, temperature=1.0,
                                       generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[:, :len(prompt)], prompt.expand(2, -1))
        assert_frame_valid(out, layout, len(prompt) // fs + 5)
    # the continuation depends on the prompt
    greedy = [sampling.generate_tokens(model, layout, q, 3, temperature=0.0)[:, -3 * fs:] for q in (None, p)]
    assert not torch.equal(*greedy)


def test_prompt_continuation_files(ckpt, quiet_tok, tmp_path):
    path = str(tmp_path / "prompt.wav")
    sf.write(path, synth_audio(1.2, 22050, seed=1), 22050)
    r = run(f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'out'}", "--num_samples=1", "--seconds=0.3", f"--prompt={path}")
    assert r.returncode == 0, r.stderr
    assert "warning: prompt" in r.stderr and "longer than the model's context" in r.stderr  # 15 frames > 64 tokens
    hop = quiet_tok.frame_hop
    p_frames = sampling.keep_frames(quiet_tok.layout, BLOCK_SIZE)
    full, sr = sf.read(tmp_path / "out" / "sample_0.wav", dtype="float32")
    cont, _ = sf.read(tmp_path / "out" / "sample_0_continuation.wav", dtype="float32")
    assert sr == 24000
    assert len(full) == (p_frames + 4) * hop and len(cont) == 4 * hop  # ceil(0.3 s / 85.3 ms) = 4 frames
    np.testing.assert_array_equal(full[p_frames * hop:], cont)
    assert str(tmp_path / "out" / "sample_0_continuation.wav") in r.stdout
    # streamed, the prompt's audio comes first, then the continuation: same files to PCM_16 rounding
    r = run(f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'stream'}", "--num_samples=1", "--seconds=0.3",
            f"--prompt={path}",
            "--stream=True", "--stream_frames=2")
    assert r.returncode == 0, r.stderr
    for name, ref in (("sample_0.wav", full), ("sample_0_continuation.wav", cont)):
        x, _ = sf.read(tmp_path / "stream" / name, dtype="float32")
        assert len(x) == len(ref), name
        np.testing.assert_allclose(x, ref, atol=2 / 32768)


# -----------------------------------------------------------------------------
# streaming

def test_stream_decoder_matches_one_pass(quiet_tok):
    layout = quiet_tok.layout
    g = torch.Generator().manual_seed(0)
    n = 12
    tokens = (torch.randint(0, layout.codebook_size, (1, n, layout.frame_size), generator=g)
              + torch.from_numpy(layout.frame_levels * layout.codebook_size)).reshape(1, -1)  # (B, n * frame_size)
    one_pass = quiet_tok.decode_codes(layout.tokens_to_codes(tokens))
    for chunk, first in ((2, 1), (3, 6)):  # `first` frames arrive together (a prompt), then one frame at a time
        dec = sampling.StreamDecoder(quiet_tok, chunk)
        parts = [dec.push(tokens[:, :first * layout.frame_size])]
        for f in tokens[:, first * layout.frame_size:].split(layout.frame_size, dim=1):
            parts.append(dec.push(f))
            # memory stays flat: only the frames a later chunk still needs are kept
            assert len(dec.frames) <= chunk + 2 * sampling.CODEC_CONTEXT_FRAMES, len(dec.frames)
        parts.append(dec.flush())
        streamed = torch.cat([p for p in parts if p is not None], dim=1)
        assert sum(p is not None for p in parts) > 2, "expected audio before the end of the stream"
        assert streamed.shape == one_pass.shape
        torch.testing.assert_close(streamed, one_pass, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_stream_cli_matches_one_shot(ckpt, tmp_path):
    common = [f"--ckpt={ckpt}", "--num_samples=2", "--seconds=0.7", "--seed=7"]
    a = run(*common, f"--out_dir={tmp_path / 'a'}")
    b = run(*common, f"--out_dir={tmp_path / 'b'}", "--stream=True", "--stream_frames=4")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "streamed" in b.stdout and "real time" in b.stdout
    for i in range(2):
        x, _ = sf.read(tmp_path / "a" / f"sample_{i}.wav", dtype="float32")
        y, _ = sf.read(tmp_path / "b" / f"sample_{i}.wav", dtype="float32")
        assert len(x) == len(y) == 9 * 2048  # ceil(0.7 s / 85.3 ms) = 9 frames
        np.testing.assert_allclose(x, y, atol=2 / 32768)  # PCM_16 rounding of values equal to ~1e-6
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]
    assert "time to first audio" in b.stdout and "real-time factor" in b.stdout
    # the static-shape frame step, what a CUDA graph captures, and the compiled CPU step, from the command line:
    # the same tokens as the eager steps, so the same audio
    for decode in ("static", "compile") if has_a_cxx_compiler() or os.environ.get("CI") == "true" else ("static",):
        c = run(*common, f"--out_dir={tmp_path / decode}", f"--decode={decode}")
        assert c.returncode == 0, c.stderr
        for i in range(2):
            x, _ = sf.read(tmp_path / "a" / f"sample_{i}.wav", dtype="float32")
            y, _ = sf.read(tmp_path / decode / f"sample_{i}.wav", dtype="float32")
            np.testing.assert_allclose(x, y, atol=2 / 32768)
        assert ("compiling the decode step" in c.stdout) == (decode == "compile")


def test_decoder_noise_is_seeded_and_the_global_rng_untouched(tok):
    """SNAC's decoder adds noise: drawn from tok.noise_seed and each frame's place in the stream, so decoding twice,
    or in chunks, gives the same audio, and the global RNG is not drawn from."""
    layout = tok.layout
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, layout.codebook_size, (2, 12, layout.frame_size), generator=g)
    tokens = (frames + torch.from_numpy(layout.frame_levels * layout.codebook_size)).reshape(2, -1)
    state = torch.get_rng_state()
    one = tok.decode_codes(layout.tokens_to_codes(tokens))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(tok.decode_codes(layout.tokens_to_codes(tokens)), one)
    torch.testing.assert_close(sampling.decode_in_chunks(tok, tokens, chunk_frames=3), one, rtol=0, atol=1e-5)
    seed = tok.noise_seed
    try:
        tok.noise_seed = seed + 1
        assert (tok.decode_codes(layout.tokens_to_codes(tokens)) - one).abs().max() > 1e-3  # the noise is there
    finally:
        tok.noise_seed = seed


def test_same_seed_writes_the_same_wav_bytes(tok, model, codec_dir, tmp_path):
    """With the codec's decoder noise on: two runs write identical files, and --stream the same audio."""
    path = str(tmp_path / "noisy.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_args": asdict(model.config),
                           "meta": {**tok.meta(), "codec": codec_dir}, "iter_num": 0})
    common = [f"--ckpt={path}", "--num_samples=2", "--seconds=0.5", "--seed=3"]
    for name, extra in (("a", []), ("b", []), ("s", ["--stream=True", "--stream_frames=2"])):
        r = run(*common, f"--out_dir={tmp_path / name}", *extra)
        assert r.returncode == 0, r.stderr
    for i in range(2):
        a, b = (open(tmp_path / d / f"sample_{i}.wav", "rb").read() for d in ("a", "b"))
        assert a == b, i
        x, _ = sf.read(tmp_path / "a" / f"sample_{i}.wav", dtype="float32")
        y, _ = sf.read(tmp_path / "s" / f"sample_{i}.wav", dtype="float32")
        np.testing.assert_allclose(x, y, atol=2 / 32768)  # PCM_16 rounding of values equal to ~1e-6


@pytest.mark.slow
def test_compile_without_a_compiler_is_one_line(ckpt, tmp_path):
    """--decode=compile where no C++ compiler works (CXX points at one that fails; an empty compile cache, so
    nothing compiled earlier is reused): one line that says what is missing and that eager needs none."""
    r = run(f"--ckpt={ckpt}", "--seconds=0.2", "--decode=compile", f"--out_dir={tmp_path / 'out'}", CXX="/bin/false",
            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "c"))
    assert_one_line_error(r, "decode=compile", "C++ compiler", "eager")


@pytest.mark.slow
def test_stream_to_stdout_is_a_wav_stream(ckpt, tmp_path):
    """--stream_to=-: stdout carries nothing but a WAV of sample 0 (what `| ffplay -` or `| aplay` play), the
    messages go to stderr, and the files are still written."""
    args = [f"--ckpt={ckpt}", "--num_samples=2", "--seconds=0.7", "--stream_frames=3", f"--out_dir={tmp_path}"]
    r = run_script("generate.py", *args, env={"HF_HUB_OFFLINE": "1"}, text=False)
    assert r.returncode == 0 and r.stdout.startswith(b"config:"), r.stderr  # without it: messages on stdout
    r = run_script("generate.py", *args, "--stream_to=-", env={"HF_HUB_OFFLINE": "1"}, text=False)
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert '"stream": true' in err.splitlines()[0]  # the echoed config shows the setting in effect
    assert "time to first audio" in err and "real-time factor" in err and "sample_1.wav" in err
    head, data = r.stdout[:44], r.stdout[44:]
    riff, _, wave, fmt, _, pcm, channels, rate, _, _, bits, tag, _ = struct.unpack("<4sI4s4sIHHIIHH4sI", head)
    assert (riff, wave, fmt, tag, pcm, channels, rate, bits) == (b"RIFF", b"WAVE", b"fmt ", b"data", 1, 1, 24000, 16)
    streamed = np.frombuffer(data, dtype="<i2")
    saved, _ = sf.read(tmp_path / "sample_0.wav", dtype="int16")
    assert len(streamed) == len(saved) == 9 * 2048
    assert np.abs(streamed.astype(np.int32) - saved).max() <= 1  # the same audio, to PCM_16 rounding
    assert os.path.isfile(tmp_path / "sample_1.wav") and not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# bad input: one line, exit 1

def test_bad_inputs(ckpt, tok, codec_dir, tmp_path):
    missing = str(tmp_path / "nope.pt")
    assert_one_line_error(run(f"--ckpt={missing}"), missing, "not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    assert_one_line_error(run(f"--ckpt={corrupt}"), str(corrupt), "damaged")
    no_meta = str(tmp_path / "no_meta.pt")
    m = tiny_gpt(tok.layout.vocab_size)
    save_checkpoint(no_meta, {"model": m.state_dict(), "model_args": asdict(m.config)})
    assert_one_line_error(run(f"--ckpt={no_meta}", f"--codec={codec_dir}"), no_meta, "tokenizer meta")
    bad_prompt = tmp_path / "prompt.wav"
    bad_prompt.write_text("this is text, not audio")
    assert_one_line_error(run(f"--ckpt={ckpt}", f"--prompt={bad_prompt}"), str(bad_prompt), "cannot be decoded")
    assert_one_line_error(run(f"--ckpt={ckpt}", "--seconds=0"), "seconds=0", "> 0")
    assert_one_line_error(run(f"--ckpt={ckpt}", "--temprature=0.5"), "temprature")
    assert_one_line_error(run(f"--ckpt={ckpt}", "--decode=fast"), "decode=fast", "expected one of")
    assert_one_line_error(run(f"--ckpt={ckpt}", "--decode=graph", "--device=cpu"), "decode=graph", "CUDA")


def test_settings_and_files_are_checked_before_any_work(tmp_path):
    """Empty --text, a --transcribe that names no file, a folder, a missing file after a good one, too many seconds,
    a seed out of range: one UserError each from check_config, before the model is loaded."""
    from common import UserError
    from config import command_line_keys, parse_config
    good = tmp_path / "good.wav"
    sf.write(good, synth_audio(0.2, 24000), 24000)
    for argv, message in (
            (["--text="], "text='': nothing to speak"), (["--text=   "], "nothing to speak"),
            (["--transcribe=,"], "transcribe=',': names no file"), (["--transcribe="], "names no file"),
            ([f"--transcribe={tmp_path}"], f"transcribe {tmp_path}: is a folder"),
            ([f"--transcribe={good},{tmp_path / 'missing.wav'}"], "missing.wav: not found"),
            ([f"--prompt={tmp_path}"], "is a folder"),
            (["--seconds=1e12"], "at most 43200"), (["--seed=-1"], "seed=-1: must be in [0, 2**32)"),
            ([f"--seed={2 ** 70}"], "must be in [0, 2**32)")):
        with pytest.raises(UserError) as e:
            generate.check_config(parse_config(generate.GenerateConfig, argv), command_line_keys(argv))
        assert message in str(e.value), (argv, str(e.value))
    generate.check_config(parse_config(generate.GenerateConfig, [f"--transcribe={good}"]), {"transcribe"})


def test_help_lists_options():
    r = run("--help")
    assert r.returncode == 0
    for key in ("--ckpt=", "--temperature=1.0", "--top_k=0", "--top_p=1.0", "--seed=1337", "--prompt_seconds=",
                "--stream=False"):
        assert key in r.stdout


def test_decode_in_chunks_matches_one_pass(quiet_tok):
    # 30 frames in chunks of 8: several chunk edges, each decoded with codec context on both sides
    layout = quiet_tok.layout
    g = torch.Generator().manual_seed(5)
    frames = torch.randint(0, layout.codebook_size, (2, 30, layout.frame_size), generator=g)
    tokens = (frames + torch.from_numpy(layout.frame_levels * layout.codebook_size)).reshape(2, -1)
    one = quiet_tok.decode_codes(layout.tokens_to_codes(tokens))
    chunked = sampling.decode_in_chunks(quiet_tok, tokens, chunk_frames=8)
    assert chunked.shape == one.shape == (2, 30 * quiet_tok.frame_hop)
    assert (chunked - one).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# bounded work and memory

def test_prompt_reads_only_the_tail_it_needs(tok, tmp_path):
    import tracemalloc

    from codec import read_audio, read_audio_tail
    audio = synth_audio(8.0, 44100, channels=2, seed=4)
    formats = {"long.wav": "WAV", "long.flac": "FLAC"}
    if "MP3" in sf.available_formats():
        formats["long.mp3"] = "MP3"
    for name, fmt in formats.items():
        sf.write(tmp_path / name, audio, 44100, format=fmt)
        whole, rate = read_audio(str(tmp_path / name))
        tail, rate2, first = read_audio_tail(str(tmp_path / name), 2.0)
        assert rate == rate2 == 44100 and len(tail) == 88200 and first == len(whole) - 88200, name
        np.testing.assert_array_equal(tail, whole[first:])  # seeking (wav, flac) and block decoding (mp3) alike
    path = str(tmp_path / "long.wav")
    tracemalloc.start()
    p = generate.load_prompt(path, tok, prompt_seconds=0.5)
    tail_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    whole = generate.load_prompt(path, tok, prompt_seconds=0)
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(p) == 6 * tok.layout.frame_size  # ceil(0.5 s / 85.3 ms) frames
    # the same tokens as encoding the whole file and keeping its end (the tail starts on the whole file's grid)
    assert (p == whole[-len(p):]).float().mean() >= 0.99
    assert tail_peak < whole_peak / 2, (tail_peak, whole_peak)  # 8 s of stereo float32 alone is 2.8 MB


def test_decoding_memory_does_not_grow_with_the_batch(quiet_tok):
    layout = quiet_tok.layout
    calls = []
    decode = quiet_tok.codec.decode

    def spy(codes):  # SNAC's decode, recording how many frames of audio each call holds (all rows together)
        calls.append(codes[0].shape[0] * codes[0].shape[1] // layout.codes_per_frame[0])
        return decode(codes)
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, layout.codebook_size, (6, 8, layout.frame_size), generator=g)
    tokens = (frames + torch.from_numpy(layout.frame_levels * layout.codebook_size)).reshape(6, -1)
    one_pass = quiet_tok.decode_codes(layout.tokens_to_codes(tokens))
    quiet_tok.codec.decode = spy
    try:
        dec = sampling.StreamDecoder(quiet_tok, chunk_frames=8, max_frames=20)  # 6 rows x 8 frames = 48 > 20
        dec.push(tokens)
        audio = dec.flush()
    finally:
        quiet_tok.codec.decode = decode
    torch.testing.assert_close(audio, one_pass, rtol=0, atol=1e-5)
    assert max(calls) <= 20 and sum(calls) == 48, calls


def test_out_dir_and_codec_problems_are_said_before_sampling(ckpt, tok, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    r = run(f"--ckpt={ckpt}", f"--out_dir={a_file}")
    assert_one_line_error(r, "a_file")
    assert "generating" not in r.stdout  # no sampling time spent before the error
    assert_one_line_error(run(f"--ckpt={ckpt}", "--out_dir="), "out_dir")
    # a checkpoint whose codec folder is gone: say how to point at a copy
    gone = str(tmp_path / "ckpt_gone.pt")
    m = tiny_gpt(tok.layout.vocab_size)
    save_checkpoint(gone, {"model": m.state_dict(), "model_args": asdict(m.config),
                           "meta": {**tok.meta(), "codec": str(tmp_path / "deleted_codec")}})
    assert_one_line_error(run(f"--ckpt={gone}", f"--out_dir={tmp_path}"), "deleted_codec", "--codec=")
    noise = tmp_path / "noise.wav"
    noise.write_bytes(os.urandom(4000))
    r = run(f"--ckpt={ckpt}", f"--prompt={noise}", f"--out_dir={tmp_path}")
    assert_one_line_error(r, "noise.wav", "not audio in a format")
    assert "does not exist" not in r.stderr


def test_text_audio_layout_static_and_eager_steps_agree():
    """In the text+audio layout a frame start may also take AUDIO_END: the static step samples that range (level 0
    + the specials) with the grammar's mask; ended rows repeat AUDIO_END. Same tokens as the eager and the recompute
    paths, greedy and sampled, with and without rows that end."""
    from tokenizer import Layout
    layout = Layout((4, 2, 1), 4096, "gpt2o_test", 300)
    end = layout.special("audio_end")
    for boost in (0.0, 8.0):  # 8: AUDIO_END likely at frame starts, so rows end (at different frames)
        model = tiny_gpt(layout.vocab_size)
        with torch.no_grad():
            model.lm_head.weight[end] += boost * torch.randn(model.config.n_embd)
        for temperature in (0.0, 1.0):
            def sample(**kw):
                g = torch.Generator().manual_seed(3)
                return sampling.generate_tokens(model, layout, None, 12, num_samples=3, temperature=temperature,
                                                generator=g, **kw)
            eager, static = sample(decode="eager"), sample(decode="static")
            recompute = sample(sampler=fixtures.nocache_frames)
            assert torch.equal(eager, static) and torch.equal(eager, recompute), (boost, temperature)
            frames = eager.reshape(3, -1, layout.frame_size)
            ended = frames[:, :, 0] == end
            for row in range(3):  # once a row has ended it says AUDIO_END at every frame start
                if ended[row].any():
                    first = int(ended[row].int().argmax())
                    assert ended[row, first:].all()


def test_full_disk_and_sigterm_leave_no_half_file(ckpt, tmp_path, small_disk):
    folder, preexec = small_disk(16 * 1024)  # the WAV headers fit, one second of audio (48 kB) does not
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), f"--ckpt={ckpt}", f"--out_dir={folder}",
                        "--num_samples=1", "--seconds=1", "--device=cpu"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, preexec_fn=preexec)
    assert_one_line_error(r, f"{folder}/sample_0.wav: ", "No space left" if preexec is None else "File too large",
                          "no sample file was written")
    assert os.listdir(folder) == []
    # SIGTERM (a scheduler's time limit, `kill`) is a Ctrl-C: the temp files go, "interrupted"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), f"--ckpt={ckpt}",
                          f"--out_dir={tmp_path}/out", "--num_samples=2", "--seconds=600", "--device=cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (
            os.path.isdir(f"{tmp_path}/out") and len(os.listdir(f"{tmp_path}/out")) == 2):
        time.sleep(0.1)
    assert sorted(os.listdir(f"{tmp_path}/out")) == [f"sample_{i}.wav.{p.pid}.tmp" for i in range(2)]
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 1 and err.endswith("error: interrupted\n"), (p.returncode, err)
    assert os.listdir(f"{tmp_path}/out") == []
