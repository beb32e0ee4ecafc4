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
from typing import Iterator

import numpy as np
import torch

from common import (BadAudio, UserError, load_checkpoint, model_from_checkpoint, parse_config, pick_device, pick_dtype,
                    read_audio, run_main)
from tokenizer import AudioTokenizer, Layout, load_codec


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


# The SNAC decoder is convolutional: a frame's audio depends on its neighbours. Measured with the 24 kHz model,
# decoding a chunk with 3 frames of real codes on each side matches one pass over the whole stream to 6e-7,
# 5 frames to 0. Streaming decodes this many frames on each side of a chunk and keeps only the middle.
CODEC_CONTEXT_FRAMES = 4
# when the context is full, the window keeps about this fraction of block_size (whole frames): the larger, the
# more history the model sees, the smaller, the fewer re-prefills (one forward of the window each)
KEEP_FRACTION = 0.75


# -----------------------------------------------------------------------------
# sampling

def frame_masks(layout: Layout, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """(frame_size, vocab_size) additive logit masks: 0 on the ids of the level each frame position needs, -inf
    elsewhere (other levels and every special token)."""
    ids = torch.arange(vocab_size)
    lo = torch.as_tensor(layout.frame_levels * layout.codebook_size)[:, None]  # (frame_size, 1)
    allowed = (ids >= lo) & (ids < lo + layout.codebook_size)  # (frame_size, vocab_size)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(device)


def keep_frames(layout: Layout, block_size: int) -> int:
    """Whole frames kept when the window slides; leaves room for the partial frame in progress plus one token."""
    fs = layout.frame_size
    if block_size < 2 * fs:
        raise UserError(f"block_size {block_size} is too small to generate: it must hold at least 2 frames ({2 * fs} tokens)")
    return max(1, min(int(KEEP_FRACTION * block_size) // fs, (block_size - fs) // fs))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) already masked -> token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a code once the codes before it already hold top_p (the most likely one always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def sample_frames(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, num_samples: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield n_frames new frames, each (num_samples, frame_size), continuing [BOUNDARY] + prompt (whole frames).

    use_cache=False recomputes the whole window for every token (nanoGPT's generate); same tokens, much slower.
    """
    fs, block_size = layout.frame_size, model.config.block_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    assert len(prompt) % fs == 0, f"prompt of {len(prompt)} tokens is not whole {fs}-token frames"
    if model.config.vocab_size < layout.vocab_size:
        raise UserError(f"the model knows {model.config.vocab_size} token ids, the tokenizer layout needs "
                        f"{layout.vocab_size}: the checkpoint was trained on another codec")
    masks = frame_masks(layout, model.config.vocab_size, device)  # (fs, V)
    keep = keep_frames(layout, block_size) * fs
    n_ctx = 1 + len(prompt)
    buf = torch.empty(num_samples, n_ctx + n_frames * fs, dtype=torch.long, device=device)  # every token, in order
    buf[:, 0] = layout.boundary_id  # every training document starts with it
    buf[:, 1:n_ctx] = prompt.to(device)
    w0, n = max(0, n_ctx - keep) if n_ctx > block_size else 0, n_ctx  # the model sees buf[:, w0:n]
    cache = model.new_kv_cache(num_samples) if use_cache else None
    prefill = True
    for step in range(n_frames * fs):
        phase = step % fs  # the prompt is whole frames, so this is the position inside the current frame
        if n - w0 > block_size:
            # slide: keep the last whole frames that fit plus the partial frame, so positions restart at 0 on a
            # frame start, and re-prefill the cache from the kept window
            w0, prefill = n - (keep + phase), True
        if cache is None:
            logits, _ = model(buf[:, w0:n])
        elif prefill:
            cache.reset()
            logits, _ = model(buf[:, w0:n], kv_cache=cache)
            prefill = False
        else:
            logits, _ = model(buf[:, n - 1:n], kv_cache=cache)
        logits = logits[:, -1, :].float() + masks[phase]  # (B, V)
        buf[:, n:n + 1] = sample_next(logits, temperature, top_k, top_p, generator)
        n += 1
        if phase == fs - 1:
            yield buf[:, n - fs:n]


def generate_tokens(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, **kwargs) -> torch.Tensor:
    """Prompt + n_frames new frames as one token stream (num_samples, len(prompt) + n_frames * frame_size).
    kwargs are sample_frames' (num_samples, temperature, top_k, top_p, generator, use_cache)."""
    frames = list(sample_frames(model, layout, prompt, n_frames, **kwargs))
    assert frames, f"n_frames={n_frames}: nothing to generate"
    p = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    return torch.cat([p.to(frames[0].device).expand(frames[0].shape[0], -1), *frames], dim=1)


# -----------------------------------------------------------------------------
# decoding while generating

class StreamDecoder:
    """Turns frames into audio as they arrive. A chunk of `chunk_frames` is decoded with CODEC_CONTEXT_FRAMES
    real frames on each side and only its middle is kept, so chunk edges sound (and are) the same as one pass."""

    def __init__(self, tok: AudioTokenizer, chunk_frames: int, context_frames: int = CODEC_CONTEXT_FRAMES):
        self.tok, self.chunk, self.context = tok, chunk_frames, context_frames
        self.frames: list[torch.Tensor] = []  # (B, frame_size) each, all so far
        self.done = 0  # frames already turned into audio

    def _decode(self, stop: int) -> torch.Tensor:
        """Audio (B, samples) of frames [done, stop), decoded with context on both sides."""
        lo, hi = max(0, self.done - self.context), min(len(self.frames), stop + self.context)
        tokens = torch.cat(self.frames[lo:hi], dim=1)  # (B, (hi - lo) * frame_size)
        audio = self.tok.decode_codes(self.tok.layout.tokens_to_codes(tokens))
        hop = self.tok.frame_hop
        audio = audio[:, (self.done - lo) * hop:(stop - lo) * hop]
        self.done = stop
        return audio

    def push(self, frames: torch.Tensor) -> torch.Tensor | None:
        """Add frames (B, k * frame_size); returns the audio that is now final, or None."""
        self.frames.extend(frames.split(self.tok.layout.frame_size, dim=1))
        if len(self.frames) - self.done >= self.chunk + self.context:
            return self._decode(len(self.frames) - self.context)
        return None

    def flush(self) -> torch.Tensor | None:
        """The audio of every frame not yet returned (the end of the stream needs no right context)."""
        return self._decode(len(self.frames)) if self.done < len(self.frames) else None


def decode_in_chunks(tok: AudioTokenizer, tokens: torch.Tensor, chunk_frames: int = 240) -> torch.Tensor:
    """(B, n_frames * frame_size) tokens -> (B, n_frames * frame_hop) audio, decoded 20 s at a time with codec
    context on both sides, so memory stays bounded however long the samples are."""
    dec = StreamDecoder(tok, chunk_frames)
    pieces = [dec.push(t) for t in tokens.split(chunk_frames * tok.layout.frame_size, dim=1)] + [dec.flush()]
    return torch.cat([p for p in pieces if p is not None], dim=1)


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
    layout = Layout.from_meta(meta)
    codec = cfg.codec or meta.get("codec")
    if not codec:
        raise UserError(f"checkpoint {cfg.ckpt}: its meta names no codec; pass --codec=<Hub id or local folder>")
    tok = load_codec(codec, device=device)
    if tok.layout != layout:
        raise UserError(f"codec {codec}: its layout (vq_strides {list(tok.layout.vq_strides)}, codebook_size "
                        f"{tok.layout.codebook_size}) is not the one the checkpoint was trained on ({meta.get('vq_strides')}, "
                        f"{meta.get('codebook_size')}); pass the checkpoint's codec with --codec")
    model = model_from_checkpoint(ckpt, device).eval()
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
