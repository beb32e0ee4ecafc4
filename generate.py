"""Sample audio from a trained checkpoint: WAV files that always decode, with a KV cache, optionally streamed.

    python generate.py --ckpt=out/sherlock/ckpt.pt --num_samples=4 --seconds=10 --out_dir=samples
    python generate.py --ckpt=out/sherlock/ckpt.pt --prompt=voice.flac --prompt_seconds=5 --seconds=10
    python generate.py --ckpt=out/sherlock/ckpt.pt --stream --seconds=60 --temperature=0.9 --top_p=0.95
    python generate.py --ckpt=out/sherlock/ckpt.pt --codec=snac_24khz_folder     # offline: a local codec copy
    python generate.py --help

Sampling is frame-valid: the position inside the current frame says which SNAC level comes next, and every id
of another level (and every special token) is masked out of the logits, so any model's output decodes to exactly
ceil(seconds * sample_rate / frame_hop) frames. Past block_size the context slides by whole frames.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import UserError, load_checkpoint, parse_config, pick_device, pick_dtype, run_main, user_errors
from model import GPT
from sampling import StreamDecoder, decode_in_chunks, keep_frames, sample_frames, generate_tokens
from tokenizer import AudioTokenizer, BadAudio, Layout, load_codec, read_audio


@dataclass
class GenerateConfig:
    ckpt: str = "out/sherlock/ckpt.pt"  # checkpoint written by train.py
    out_dir: str = "samples"  # sample_<i>.wav (and sample_<i>_continuation.wav with a prompt) go here
    num_samples: int = 4  # generated together, in one batch
    seconds: float = 10.0  # audio to generate per sample (after the prompt)
    temperature: float = 1.0  # 0 = greedy (always the most likely code)
    top_k: int = 0  # keep only the k most likely codes; 0 = off
    top_p: float = 1.0  # nucleus sampling: the smallest set of codes with this much probability; 1 = off
    seed: int = 1337  # same seed, same tokens on the same device
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16 (half precision on CUDA only)
    codec: str = ""  # Hub id or local folder; "" = the codec named in the checkpoint's tokenizer meta
    prompt: str = ""  # an audio file to continue (any format soundfile reads, any rate, any channels)
    prompt_seconds: float = 0.0  # keep only the last N seconds of the prompt; 0 = all of it
    stream: bool = False  # decode and write audio while tokens are generated
    stream_frames: int = 12  # frames per streamed chunk (12 frames = 1 s at 24 kHz)


class WavWriter:
    """Appends to a WAV under a temp name beside `path`, renamed into place by close() (never half a file)."""

    def __init__(self, path: str, sample_rate: int):
        import soundfile as sf
        self.path, self.tmp = path, f"{path}.{os.getpid()}.tmp"
        self.f = sf.SoundFile(self.tmp, "w", samplerate=sample_rate, channels=1, format="WAV", subtype="PCM_16")

    def write(self, audio: np.ndarray) -> None:
        if len(audio):
            self.f.write(audio)

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# -----------------------------------------------------------------------------
# the script

def load_prompt(path: str, tok: AudioTokenizer, prompt_seconds: float) -> torch.Tensor:
    """An audio file -> the tokens of its whole frames (the last prompt_seconds of it when that is > 0)."""
    if not os.path.isfile(path):
        raise UserError(f"prompt {path}: not found (pass --prompt=<an audio file>)")
    try:
        wav, sr = read_audio(path)
    except BadAudio as e:
        raise UserError(f"prompt {path}: {e}; expected WAV, FLAC, OGG, MP3 or another format libsndfile reads") from None
    # keep whole frames of real audio: a partial last frame would be padded with silence by the codec, and the
    # model would continue from that silence
    audio = tok.to_mono(wav, sr)
    audio = audio[:max(1, len(audio) // tok.frame_hop) * tok.frame_hop]
    tokens = torch.from_numpy(tok.encode(audio.numpy(), tok.sample_rate))
    if prompt_seconds > 0:
        frames = math.ceil(prompt_seconds * tok.sample_rate / tok.frame_hop)
        tokens = tokens[-frames * tok.layout.frame_size:]
    return tokens


def load_model(cfg: GenerateConfig, device: str, dtype: str):
    ckpt = load_checkpoint(cfg.ckpt)
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or "layout" not in meta:
        raise UserError(f"checkpoint {cfg.ckpt}: has no tokenizer meta ('meta' with the codec and token layout); "
                        "it was not written by gpt2o's train.py from a prepare_audio.py dataset")
    with user_errors():
        layout = Layout.from_meta(meta)
    codec = cfg.codec or meta.get("codec")
    if not codec:
        raise UserError(f"checkpoint {cfg.ckpt}: its meta names no codec; pass --codec=<Hub id or local folder>")
    with user_errors():
        tok = load_codec(codec, device=device)
    if tok.layout != layout:
        raise UserError(f"codec {codec}: its layout (vq_strides {list(tok.layout.vq_strides)}, codebook_size "
                        f"{tok.layout.codebook_size}) is not the one the checkpoint was trained on ({meta.get('vq_strides')}, "
                        f"{meta.get('codebook_size')}); pass the checkpoint's codec with --codec")
    model = GPT.from_checkpoint(ckpt).to(device).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))  # inference only: half-precision weights, no per-step autocast casts
    return model, tok


def check_config(cfg: GenerateConfig) -> None:
    if not cfg.seconds > 0:
        raise UserError(f"seconds={cfg.seconds}: must be > 0 (the length of audio to generate)")
    if cfg.num_samples < 1:
        raise UserError(f"num_samples={cfg.num_samples}: must be at least 1")
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


def main() -> None:
    cfg = parse_config(GenerateConfig, sys.argv[1:], __doc__)
    check_config(cfg)
    print(f"config: {cfg}", flush=True)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model, tok = load_model(cfg, device, dtype)
    layout, fs, hop, sr = tok.layout, tok.layout.frame_size, tok.frame_hop, tok.sample_rate
    n_frames = math.ceil(cfg.seconds * sr / hop)

    prompt = None
    if cfg.prompt:
        prompt = load_prompt(cfg.prompt, tok, cfg.prompt_seconds)
        if 1 + len(prompt) > model.config.block_size:
            prompt = prompt[-keep_frames(layout, model.config.block_size) * fs:]
            print(f"warning: prompt {cfg.prompt} is longer than the model's context ({model.config.block_size} tokens); "
                  f"using its last {len(prompt) // fs * hop / sr:.2f} s", file=sys.stderr, flush=True)
    p_frames = 0 if prompt is None else len(prompt) // fs
    print(f"generating {cfg.num_samples} x {n_frames * hop / sr:.2f} s ({n_frames} frames, {n_frames * fs} tokens)"
          + (f" after a {p_frames * hop / sr:.2f} s prompt" if prompt is not None else "") + f" on {device}", flush=True)

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    knobs = dict(num_samples=cfg.num_samples, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                 generator=generator)
    os.makedirs(cfg.out_dir, exist_ok=True)
    paths = [os.path.join(cfg.out_dir, f"sample_{i}.wav") for i in range(cfg.num_samples)]
    cont_paths = [p[:-4] + "_continuation.wav" for p in paths] if prompt is not None else []

    t_lm = t_codec = 0.0
    t_start = time.perf_counter()
    if not cfg.stream:
        t0 = time.perf_counter()
        tokens = generate_tokens(model, layout, prompt, n_frames, **knobs)  # (B, (p_frames + n_frames) * fs)
        t_lm = time.perf_counter() - t0
        t0 = time.perf_counter()
        audio = decode_in_chunks(tok, tokens).cpu().numpy()  # (B, samples)
        t_codec = time.perf_counter() - t0
        writers = [WavWriter(p, sr) for p in paths + cont_paths]
        for i in range(cfg.num_samples):
            writers[i].write(audio[i])
            if cont_paths:
                writers[cfg.num_samples + i].write(audio[i, p_frames * hop:])
        for w in writers:
            w.close()
    else:
        writers = [WavWriter(p, sr) for p in paths + cont_paths]
        try:
            dec = StreamDecoder(tok, cfg.stream_frames)
            written = 0  # samples written to each sample_<i>.wav so far

            def emit(audio: torch.Tensor | None) -> None:
                nonlocal written
                if audio is None:
                    return
                audio = audio.cpu().numpy()  # (B, samples)
                start = max(0, p_frames * hop - written)  # where the continuation starts inside this chunk
                for i in range(cfg.num_samples):
                    writers[i].write(audio[i])
                    if cont_paths:
                        writers[cfg.num_samples + i].write(audio[i, start:])
                written += audio.shape[1]
                wall = time.perf_counter() - t_start
                print(f"streamed {written / sr:6.2f} s of audio in {wall:6.2f} s ({written / sr / wall:.2f}x real time)",
                      flush=True)

            if prompt is not None:
                t0 = time.perf_counter()
                a = dec.push(prompt.to(device).expand(cfg.num_samples, -1))
                t_codec += time.perf_counter() - t0
                emit(a)
            t0 = time.perf_counter()
            for frame in sample_frames(model, layout, prompt, n_frames, **knobs):
                t1 = time.perf_counter()
                t_lm += t1 - t0
                a = dec.push(frame)
                t_codec += time.perf_counter() - t1
                emit(a)
                t0 = time.perf_counter()  # the next frame's LM time starts here
            t0 = time.perf_counter()
            a = dec.flush()
            t_codec += time.perf_counter() - t0
            emit(a)
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for w in writers:
            w.close()
    wall = time.perf_counter() - t_start
    gen_seconds = n_frames * hop / sr
    print(f"LM: {cfg.num_samples * n_frames * fs / t_lm:.1f} tokens/s ({cfg.num_samples} samples), "
          f"{cfg.num_samples * gen_seconds / t_lm:.2f}x real time | codec: "
          f"{cfg.num_samples * (p_frames + n_frames) * hop / sr / max(t_codec, 1e-9):.2f}x real time | "
          f"wall {wall:.1f} s", flush=True)
    for p in paths + cont_paths:
        print(p)


if __name__ == "__main__":
    run_main(main)
