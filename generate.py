"""Sample audio from a trained checkpoint: WAV files that always decode, with a KV cache, optionally streamed.

    python generate.py --ckpt=out/sherlock/ckpt.pt --num_samples=4 --seconds=10 --out_dir=samples
    python generate.py --ckpt=out/sherlock/ckpt.pt --prompt=voice.flac --prompt_seconds=5 --seconds=10
    python generate.py --ckpt=out/sherlock/ckpt.pt --stream --seconds=60 --temperature=0.9 --top_p=0.95
    python generate.py --stream_to=- --num_samples=1 --seconds=60 | ffplay -nodisp -autoexit -   # hear it as it is made
    python generate.py --ckpt=out/sherlock/ckpt.pt --codec=snac_24khz_folder     # offline: a local codec copy
    python generate.py --ckpt=out/sherlock/ckpt.pt --device=cpu --decode=compile --seconds=300  # long, on a CPU
    python generate.py --ckpt=out/ljspeech/ckpt.pt --text="It is a capital mistake to theorize before one has data."
    python generate.py --ckpt=out/ljspeech/ckpt.pt --transcribe=recording.flac,other.wav   # prints one line per file
    python generate.py --ckpt=out/libritts/ckpt.pt --text="Good evening." --voice=84   # a trained speaker's voice
    python generate.py --ckpt=out/libritts/ckpt.pt --text="New words." --prompt=ref.wav --prompt_text="What ref says."
    python generate.py --help

Sampling is frame-valid: the position inside the current frame says which SNAC level comes next, and every id
of another level (and every text id and special token but AUDIO_END at a frame start) is masked out of the
logits, so any model's output decodes to whole frames: ceil(seconds * sample_rate / frame_hop) of them, or fewer
where a model trained on text+audio data ends its audio. Past block_size the context slides by whole frames.
On CUDA each frame of decode steps (7 tokens, sampler included) is one CUDA graph replay (sampling.py; --decode
picks another path). On a CPU, --decode=compile compiles the one-token step to C++ first (once per process) and
then samples faster than the default eager steps: worth it for minutes of audio, not for a 10 s sample
(`python bench.py generate` measures both).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from codec import ENCODE_MARGIN_SECONDS, AudioTokenizer, BadAudio, WavWriters, read_audio, read_audio_tail
from common import UserError, pick_device, pick_dtype, run_main, user_errors
from config import command_line_keys, parse_config
from model import GPT
from sampling import CODEC_CONTEXT_FRAMES, DECODE_FRAMES, DECODE_MODES, StreamDecoder, keep_frames, sample_frames
import speech
from speech import transcribe_tokens
from tokenizer import voice_text


@dataclass
class GenerateConfig:
    ckpt: str = "out/sherlock/ckpt.pt"  # a train.py checkpoint (.pt), a folder written by export.py, or a Hub model id
    out_dir: str = "samples"  # sample_<i>.wav (and sample_<i>_continuation.wav with a prompt) go here
    num_samples: int = 4  # generated together, in one batch
    seconds: float = 10.0  # audio to generate per sample (after the prompt)
    temperature: float = 1.0  # 0 = greedy (always the most likely code)
    top_k: int = 0  # keep only the k most likely codes; 0 = off
    top_p: float = 1.0  # nucleus sampling: the smallest set of codes with this much probability; 1 = off
    seed: int = 1337  # same seed, same tokens and the same audio on the same device
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16 (half precision on CUDA only)
    codec: str = ""  # Hub id or local folder; "" = the codec named in the checkpoint's tokenizer meta
    prompt: str = ""  # an audio file to continue (any format soundfile reads, any rate, any channels)
    prompt_seconds: float = 0.0  # keep only the last N seconds of the prompt; 0 = all of it
    stream: bool = False  # decode and write audio while tokens are generated
    stream_frames: int = 12  # frames per streamed chunk (12 frames = 1 s at 24 kHz)
    text: str = ""  # speak this text: audio until the model ends it, --seconds at most (text+audio checkpoints)
    transcribe: str = ""  # audio file(s), comma-separated: print the text the model writes for each, one line each
    text_temperature: float = 0.0  # for --transcribe: 0 = greedy (the most likely text); top_k/top_p apply too
    stream_to: str = ""  # "-": also write sample 0 to stdout as a WAV stream while it is made (implies --stream)
    decode: str = "auto"  # decode steps: auto (graph on CUDA, else eager), eager, static, graph, compile (see README)
    voice: str = ""  # with --text: speak in this trained speaker's voice (the checkpoint's meta lists its voices)
    prompt_text: str = ""  # with --text and --prompt: what the prompt says; the text is spoken in the prompt's voice


# a 16-bit WAV file holds at most 4 GB: 12 h of audio at up to 48 kHz
MAX_SECONDS = 12 * 3600


# -----------------------------------------------------------------------------
# the script

def load_prompt(path: str, tok: AudioTokenizer, prompt_seconds: float, kind: str = "prompt") -> torch.Tensor:
    """An audio file -> the tokens of its whole frames (the last prompt_seconds of it when that is > 0).
    kind names the option it came from in error messages ("prompt", "transcribe").

    With prompt_seconds only the file's tail is decoded: the frames kept, plus codec context before them, starting
    on the frame grid of the whole file, so the tokens are those of encoding the whole file and keeping its end."""
    check_audio_path(path, kind)
    sr, hop = tok.sample_rate, tok.frame_hop
    frames = math.ceil(prompt_seconds * sr / hop)
    try:
        if prompt_seconds > 0:
            # slack: one partial frame at the end, the codec's context margin, and a grid step at the start
            wav, rate, first = read_audio_tail(path, (frames + 1) * hop / sr + ENCODE_MARGIN_SECONDS + 0.5)
        else:
            (wav, rate), first = read_audio(path), 0
        n_frames = max(1, tok.resampled_length(first + len(wav), rate) // hop)  # whole frames of the whole file
        # start the tail on a codec sample that is both a frame start and the image of a file sample, so resampling
        # and encoding see the grid they see in the whole file
        step = math.lcm(hop, sr // math.gcd(sr, rate))
        first_codec = -(-first * sr // rate)  # the tail's first sample in codec samples, rounded up
        start = -(-first_codec // step) * step  # ... and up to the grid
        if first and start > (n_frames - frames) * hop - ENCODE_MARGIN_SECONDS * sr:  # a coarse grid (odd rate)
            (wav, rate), first, start = read_audio(path), 0, 0
    except BadAudio as e:
        raise UserError(f"{kind} {path}: {e}; expected WAV, FLAC, OGG, MP3 or another format libsndfile "
                        "reads") from None
    # keep whole frames of real audio: a partial last frame would be padded with silence by the codec, and the
    # model would continue from that silence
    wav = wav[start * rate // sr - first:]
    audio = tok.to_mono(wav, rate)[:n_frames * hop - start]
    tokens = torch.from_numpy(tok.encode(audio.numpy(), sr))
    return tokens[-frames * tok.layout.frame_size:] if prompt_seconds > 0 else tokens


def check_audio_path(path: str, kind: str) -> None:
    """An audio file given to --prompt or --transcribe must be a file that exists (kind names the option)."""
    if os.path.isdir(path):
        raise UserError(f"{kind} {path}: is a folder; pass audio files (--{kind}=<an audio file>"
                        f"{', comma-separated' if kind == 'transcribe' else ''})")
    if not os.path.isfile(path):
        raise UserError(f"{kind} {path}: not found (pass --{kind}=<an audio file>)")


def load_model(cfg: GenerateConfig, device: str, dtype: str):
    text_for = "--text" if cfg.text else "--transcribe" if cfg.transcribe else ""
    with user_errors():
        return speech.load_model(cfg.ckpt, cfg.codec, device, dtype, text_for, cfg.seed, cfg.voice)


def warm_up(model, tok: AudioTokenizer, cfg: GenerateConfig, chunk_frames: int) -> None:
    """CUDA loads kernels and creates library handles on their first use, and sampling captures its CUDA graphs
    (or compiles its step, --decode=compile) at its first run for a batch size: sample one frame and decode one codec
    chunk of the streaming size now, as part of loading, so the time to first audio does not pay for that."""
    # two frames: a compiled step (--decode=compile) has a second graph for frame starts in the text+audio layout
    for _ in sample_frames(model, tok.layout, None, 2, num_samples=cfg.num_samples, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, decode=cfg.decode):
        pass
    n = chunk_frames + CODEC_CONTEXT_FRAMES  # the first chunk: no left context yet
    tokens = torch.from_numpy(tok.layout.frame_lo).repeat(n)[None]  # code 0 of every level
    tok.decode_codes(tok.layout.tokens_to_codes(tokens.to(tok.device)))
    if torch.device(tok.device).type == "cuda":
        torch.cuda.synchronize(tok.device)


def fit_prompt(path: str, tok: AudioTokenizer, prompt_seconds: float, block_size: int) -> torch.Tensor:
    """load_prompt, then only the last whole frames that fit the model's context (with a warning)."""
    prompt, fs = load_prompt(path, tok, prompt_seconds), tok.layout.frame_size
    if len(tok.layout.audio_context()) + len(prompt) > block_size:
        prompt = prompt[-keep_frames(tok.layout, block_size) * fs:]
        print(f"warning: prompt {path} is longer than the model's context ({block_size} tokens); using its last "
              f"{len(prompt) // fs * tok.frame_hop / tok.sample_rate:.2f} s", file=sys.stderr, flush=True)
    return prompt


def print_speed(tok: AudioTokenizer, dec: StreamDecoder, p_frames: int, timer: dict[str, float], wall: float,
                log) -> None:
    """The LM's and the codec's speed, and where each sample ended (text+audio models end their audio)."""
    fs, hop, sr, rows = tok.layout.frame_size, tok.frame_hop, tok.sample_rate, len(dec.ends)
    n_frames = dec.n_frames - p_frames  # sampled, ended rows included (sampling stops when all have ended)
    print(f"LM: {rows * n_frames * fs / timer['lm']:.1f} tokens/s ({rows} samples), "
          f"{rows * n_frames * hop / sr / timer['lm']:.2f}x real time | codec: "
          f"{rows * (p_frames + n_frames) * hop / sr / max(timer['codec'], 1e-9):.2f}x real time | "
          f"wall {wall:.1f} s", file=log, flush=True)
    if tok.layout.text_vocab:
        kept = [n_frames if end is None else end - p_frames for end in dec.ends]  # each row's frames before its end
        print("seconds per sample, ended by the model (*) or at --seconds: " + ", ".join(
            f"{k * hop / sr:.2f}{'*' if k < n_frames else ''}" for k in kept), file=log, flush=True)


def check_writable(folder: str) -> None:
    if not folder:
        raise UserError("out_dir is empty: pass --out_dir=<folder for the WAV files>")
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise UserError(f"out_dir {folder}: not writable (pass another --out_dir)")


def stream_audio(dec: StreamDecoder, prompt: torch.Tensor | None, frames: Iterator[torch.Tensor], num_samples: int,
                 timer: dict[str, float]) -> Iterator[torch.Tensor]:
    """Final audio (B, samples) as the decoder releases it: the prompt's first, then the generated frames'.
    Adds the seconds spent sampling and decoding to timer["lm"] and timer["codec"] (not the caller's writing)."""
    pieces = [dec.push(prompt.expand(num_samples, -1))] if prompt is not None else []
    t0 = time.perf_counter()
    for frame in frames:
        t1 = time.perf_counter()
        pieces.append(dec.push(frame))
        timer["lm"], timer["codec"] = timer["lm"] + t1 - t0, timer["codec"] + time.perf_counter() - t1
        yield from (p for p in pieces if p is not None)
        pieces.clear()
        t0 = time.perf_counter()
    t1 = time.perf_counter()
    last = dec.flush()
    timer["codec"] += time.perf_counter() - t1
    if last is not None:
        yield last


def speech_context(text: str, tok: AudioTokenizer, block_size: int, voice: str = "") -> torch.Tensor:
    """--text -> [BOUNDARY, TEXT_START, its text ids, TEXT_END, AUDIO_START]: a speech-from-text item to continue
    (in a trained voice: its name before the text, voice_text's rule)."""
    context = torch.from_numpy(tok.layout.speech_context(tok.encode_text(voice_text(text, voice))))
    room = block_size - len(context)
    if room < 2 * tok.layout.frame_size:
        raise UserError(f"text: {len(context) - 4} tokens leave no room for audio in the model's context of "
                        f"{block_size} tokens; pass a shorter --text")
    return context


def clone_context(cfg: GenerateConfig, tok: AudioTokenizer, block_size: int) -> torch.Tensor:
    """--text with --prompt and --prompt_text: [both texts and the reference's audio, as a cloning item] open after
    AUDIO_START, fitted to the context by speech.fit_clone (with a warning when the reference is cut)."""
    ref_text, text = tok.encode_text(cfg.prompt_text), tok.encode_text(cfg.text)
    ref = load_prompt(cfg.prompt, tok, cfg.prompt_seconds)
    try:
        context, cut = speech.fit_clone(tok.layout, ref.numpy(), ref_text, text, block_size)
    except ValueError as e:
        raise UserError(f"text, prompt_text: {e}; pass shorter texts") from None
    if cut:
        kept = len(ref) // tok.layout.frame_size - cut
        print(f"warning: prompt {cfg.prompt} is longer than the model's context leaves room for; using its last "
              f"{kept * tok.frame_hop / tok.sample_rate:.2f} s", file=sys.stderr, flush=True)
    return torch.from_numpy(context)


def transcribe_files(cfg: GenerateConfig, model: GPT, tok: AudioTokenizer, device: str) -> None:
    """--transcribe: one line per file, `<file>: <text>`, the text the model writes after the file's audio."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for path in transcribe_paths(cfg):
        audio = load_prompt(path, tok, 0.0, kind="transcribe")
        text, heard = transcribe_tokens(model, tok, audio, temperature=cfg.text_temperature, top_k=cfg.top_k,
                                        top_p=cfg.top_p, generator=generator)
        if heard < len(audio):
            print(f"warning: transcribe {path}: longer than the model's context ({model.config.block_size} tokens); "
                  f"transcribing its first {heard // tok.layout.frame_size * tok.frame_hop / tok.sample_rate:.2f} s",
                  file=sys.stderr, flush=True)
        print(f"{path}: {text}", flush=True)
        if not text:
            print(f"note: transcribe {path}: the model wrote no text for it", file=sys.stderr, flush=True)


def transcribe_paths(cfg: GenerateConfig) -> list[str]:
    return [p.strip() for p in cfg.transcribe.split(",") if p.strip()]


def check_config(cfg: GenerateConfig, given: set[str] = frozenset()) -> None:
    """Every setting, and every file named, before any work; given: the keys set on the command line."""
    if not 0 < cfg.seconds <= MAX_SECONDS:
        raise UserError(f"seconds={cfg.seconds}: must be > 0 and at most {MAX_SECONDS} (12 h: a WAV file holds at "
                        "most 4 GB)")
    if cfg.num_samples < 1:
        raise UserError(f"num_samples={cfg.num_samples}: must be at least 1")
    if not 0 <= cfg.seed < 2 ** 32:
        raise UserError(f"seed={cfg.seed}: must be in [0, 2**32)")
    if cfg.temperature < 0:
        raise UserError(f"temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
    if cfg.top_k < 0:
        raise UserError(f"top_k={cfg.top_k}: must be >= 0 (0 = off)")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"top_p={cfg.top_p}: must be in (0, 1] (1 = off)")
    if cfg.prompt_seconds < 0:
        raise UserError(f"prompt_seconds={cfg.prompt_seconds}: must be >= 0 (0 = the whole prompt)")
    if cfg.stream_frames < 1:
        raise UserError(f"stream_frames={cfg.stream_frames}: must be at least 1")
    if cfg.text_temperature < 0:
        raise UserError(f"text_temperature={cfg.text_temperature}: must be >= 0 (0 = greedy)")
    if ("text" in given or cfg.text) and not cfg.text.strip():
        raise UserError(f"text={cfg.text!r}: nothing to speak; pass --text=<words>, or no --text for unconditional "
                        "audio")
    if ("transcribe" in given or cfg.transcribe) and not transcribe_paths(cfg):
        raise UserError(f"transcribe={cfg.transcribe!r}: names no file; pass --transcribe=<audio file>[,<audio "
                        "file>...]")
    if cfg.text and cfg.prompt and not cfg.prompt_text.strip():
        raise UserError("--text with --prompt speaks the text in the prompt's voice: pass --prompt_text=<what the "
                        "prompt says> too (or drop --prompt)")
    if cfg.prompt_text and not (cfg.text and cfg.prompt):
        raise UserError("--prompt_text is what --prompt says, for voice cloning: pass --text and --prompt with it")
    if cfg.voice and (not cfg.text or cfg.prompt):
        raise UserError(f"--voice={cfg.voice}: a trained voice speaks --text; pass --text=<words> (and no --prompt, "
                        "whose own voice a --prompt_text clones)")
    if sum(map(bool, (cfg.text, cfg.transcribe, cfg.prompt and not cfg.text))) > 1:
        raise UserError("--text, --transcribe and --prompt are separate modes: pass one of them (--text with "
                        "--prompt and --prompt_text clones a voice)")
    for path in transcribe_paths(cfg):
        check_audio_path(path, "transcribe")
    if cfg.prompt:
        check_audio_path(cfg.prompt, "prompt")
    if cfg.decode not in DECODE_MODES:
        raise UserError(f"decode={cfg.decode}: expected one of {', '.join(DECODE_MODES)} (see sampling.py)")
    if cfg.stream_to not in ("", "-"):
        raise UserError(f"stream_to={cfg.stream_to}: the only stream target is stdout (--stream_to=-); the files "
                        "in out_dir are written either way")


def main() -> None:
    with user_errors():
        cfg = parse_config(GenerateConfig, sys.argv[1:], __doc__)
    check_config(cfg, command_line_keys(sys.argv[1:]))
    cfg = dataclasses.replace(cfg, stream=cfg.stream or bool(cfg.stream_to))  # the setting in effect, as echoed
    log = sys.stderr if cfg.stream_to else sys.stdout  # stdout carries the WAV stream then
    print("config:", json.dumps(dataclasses.asdict(cfg)), file=log, flush=True)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.decode == "graph" and not device.startswith("cuda"):
        raise UserError(f"decode=graph captures CUDA graphs, the device is {device}: use eager, static or compile")
    paths = [os.path.join(cfg.out_dir, f"sample_{i}.wav") for i in range(cfg.num_samples)]
    cont_paths = [p[:-4] + "_continuation.wav" for p in paths] if cfg.prompt and not cfg.text else []
    if not cfg.transcribe:
        check_writable(cfg.out_dir)  # before any sampling time is spent
    model, tok = load_model(cfg, device, dtype)
    layout, fs, hop, sr = tok.layout, tok.layout.frame_size, tok.frame_hop, tok.sample_rate
    n_frames = math.ceil(cfg.seconds * sr / hop)
    if (cfg.text or cfg.transcribe) and not layout.text_vocab:
        raise UserError(f"checkpoint {cfg.ckpt}: trained on audio only (layout {layout.name}); --text and "
                        "--transcribe need a model trained on text+audio data (prepare_audio.py with transcripts)")
    if cfg.transcribe:
        return transcribe_files(cfg, model, tok, device)
    context = speech_context(cfg.text, tok, model.config.block_size, cfg.voice) if cfg.text else None
    stream = cfg.stream
    if device.startswith("cuda") or cfg.decode == "compile":
        if cfg.decode == "compile":
            on = "" if device.startswith("cuda") else ": ~30 s on 2 CPU cores"
            print(f"compiling the decode step (once per process{on})", file=log, flush=True)
        with user_errors():  # a compile that cannot run (no C++ compiler) says so in one line
            warm_up(model, tok, cfg, cfg.stream_frames if stream else DECODE_FRAMES)

    t_start = time.perf_counter()  # the wall time includes encoding the prompt
    if cfg.text and cfg.prompt:  # cloning: the reference is part of the context, not audio to continue
        context = clone_context(cfg, tok, model.config.block_size)
    continued = cfg.prompt and not cfg.text
    prompt = fit_prompt(cfg.prompt, tok, cfg.prompt_seconds, model.config.block_size) if continued else None
    p_frames = 0 if prompt is None else len(prompt) // fs
    prompt = None if prompt is None else prompt.to(device)
    after = f" after a {p_frames * hop / sr:.2f} s prompt" if prompt is not None else ""
    after += f" speaking {len(context) - 4} text tokens" if context is not None and not cfg.prompt else ""
    after += f" in the voice of {cfg.voice}" if cfg.voice else f" in the voice of {cfg.prompt}" if cfg.prompt and \
        cfg.text else ""
    up_to = "up to " if layout.text_vocab else ""  # the audio ends where the model says so, or at --seconds
    print(f"generating {cfg.num_samples} x {up_to}{n_frames * hop / sr:.2f} s ({n_frames} frames, {n_frames * fs} "
          f"tokens){after} on {device}", file=log, flush=True)

    # one path: without --stream, audio is decoded in large chunks (bounded memory) and written when ready
    t_sample = time.perf_counter()  # time to first audio counts from here: cache, CUDA graphs and prefill included
    t_first = None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    frames = sample_frames(model, layout, prompt, n_frames, num_samples=cfg.num_samples, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, context=context, decode=cfg.decode)
    dec = StreamDecoder(tok, cfg.stream_frames if stream else DECODE_FRAMES)  # it also notes where rows end
    timer = {"lm": 0.0, "codec": 0.0}
    pipe = sys.stdout.buffer if cfg.stream_to else None
    try:
        with WavWriters(paths, cont_paths, sr, p_frames * hop, pipe) as out:
            for audio in stream_audio(dec, prompt, frames, cfg.num_samples, timer):
                # the decoder lags the sampler, so a row's end is known before any audio past it comes out
                out.write(audio.cpu().numpy(), [(end if end is not None else 1 << 40) * hop for end in dec.ends])
                t_first = t_first or time.perf_counter()
                if stream:
                    wall = time.perf_counter() - t_start
                    print(f"streamed {out.written / sr:6.2f} s of audio in {wall:6.2f} s "
                          f"({out.written / sr / wall:.2f}x real time)", file=log, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        raise UserError("--stream_to=-: stdout was closed before the end of the stream (did the player quit?); "
                        "no file was written") from None
    t_end = time.perf_counter()
    print_speed(tok, dec, p_frames, timer, t_end - t_start, log)
    if stream:
        print(f"time to first audio {(t_first - t_sample) * 1000:.0f} ms (from the start of sampling to the first "
              f"samples written) | real-time factor {out.written / sr / (t_end - t_sample):.2f}x (seconds of audio "
              f"per second, from the start of sampling)", file=log, flush=True)
    for p in paths + cont_paths:
        print(p, file=log)


if __name__ == "__main__":
    run_main(main, on_full_disk="no sample file was written (each is renamed into place only when whole): free some "
                                "space and run it again")
