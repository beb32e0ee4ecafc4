"""The SNAC codec around the token layout: audio files read, downmixed and resampled, audio <-> token ids, WAVs out.

    tok = load_codec("hubertsiuzdak/snac_24khz", text_encoding="gpt2")   # or a local codec folder; "" = audio only
    ids = tok.encode(*read_audio("voice.flac"))            # any format, rate and channels -> audio token ids
    audio = tok.decode(ids)                                # float32 at tok.sample_rate, whole frames

Where each id goes is tokenizer.py's (tok.layout); this file holds what needs soundfile, soxr or SNAC. Reading and
resampling need no codec, so prepare_audio.py runs them in worker processes. Long audio goes through SNAC in chunks
with real audio on both sides (chunk_plan), and many clips' chunks share codec calls (encode_many), with the same
codes as one pass over each clip.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import sys
import tempfile
import warnings
from contextlib import contextmanager
from functools import cached_property
from typing import BinaryIO, Callable

import numpy as np
import torch

from common import write_failed
from tokenizer import Layout, load_text_encoding, text_token_bytes

DEFAULT_CODEC = "hubertsiuzdak/snac_24khz"
# real audio encoded on each side of a chunk (whose codes are then dropped), so chunked codes equal one pass's
ENCODE_MARGIN_SECONDS = 0.75


# -----------------------------------------------------------------------------
# audio files: one reader for datasets (prepare_audio.py) and prompts (generate.py)

def downmix(audio: np.ndarray) -> np.ndarray:
    """(samples, channels) -> (samples,) by averaging the channels; (samples,) is returned as is."""
    return audio.mean(axis=1) if audio.ndim == 2 else audio


READ_BLOCK = 1 << 20  # frames per soundfile read: peak memory is the mono file plus one block


class BadAudio(Exception):
    """An audio file that cannot be used; the message is the reason, shown to the user (and stored in meta.json)."""


@contextmanager
def captured_c_stderr():
    """libmpg123 prints its complaints about a damaged mp3 straight to file descriptor 2; keep them off the
    terminal so each bad file gets exactly one warning line (ours, with the reason)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def read_audio(source: str | bytes) -> tuple[np.ndarray, int]:
    """Decode a whole file, given its path or its bytes (an audio cell of a parquet file) -> (float32 mono samples
    at the file's own rate, rate). Raises BadAudio(reason)."""
    audio, rate, _ = _read_audio(source, 0.0)
    return audio, rate


def read_audio_tail(path: str, seconds: float) -> tuple[np.ndarray, int, int]:
    """Only the last `seconds` of a file -> (float32 mono samples, rate, index in the file of the first one).
    Memory is the tail's, whatever the file's length: formats that can seek start there; MP3 (whose length is only
    an estimate) is decoded block by block, keeping the tail. Raises BadAudio(reason)."""
    return _read_audio(path, seconds)


def _read_audio(source: str | bytes, last_seconds: float) -> tuple[np.ndarray, int, int]:
    import soundfile as sf
    if len(source) == 0 if isinstance(source, bytes) else os.path.getsize(source) == 0:
        raise BadAudio("empty file (0 bytes)")
    blocks: list[np.ndarray] = []
    first = 0  # index in the file of blocks[0][0]
    try:
        with captured_c_stderr(), sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as f:
            rate, declared, info = f.samplerate, f.frames, f.extra_info
            keep = math.ceil(last_seconds * rate) if last_seconds > 0 else 0
            if keep and f.seekable() and f.format != "MP3" and declared > keep:
                first = f.seek(declared - keep)
            end = first  # index of the next sample to decode
            while True:
                # f.read stops at the end of what can be decoded (f.blocks() would pad a truncated mp3 with stale data)
                block = f.read(READ_BLOCK, dtype="float32", always_2d=True)  # (n, channels)
                if not len(block):
                    break
                blocks.append(downmix(block))
                end += len(block)
                while keep and len(blocks) > 1 and end - first - len(blocks[0]) >= keep:
                    first += len(blocks.pop(0))  # a whole block before the tail
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
        reason = (getattr(e, "error_string", None) or str(e).splitlines()[0]).strip().rstrip(".")
        if "does not exist" in reason or "not recognised" in reason:
            # libsndfile says "File does not exist or is not a regular file" of bytes in no format it knows
            reason = "not audio in a format libsndfile knows, or damaged beyond reading"
        raise BadAudio(f"cannot be decoded ({reason})") from None
    # a truncated WAV/AIFF reads "fine" (libsndfile shortens it silently) but its header log says so
    m = re.search(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.MULTILINE)
    # (but for 0xFFFFFFFF, the size a WAV streamed to a pipe declares: "until the stream ends")
    if m and int(m.group(3)) < int(m.group(2)) != 0xFFFFFFFF:
        raise BadAudio(f"truncated: its header declares {m.group(2)} bytes of audio, only {m.group(3)} are present")
    if declared > 0 and end < 0.99 * declared:  # mp3 lengths are estimates: allow 1%
        raise BadAudio(f"truncated or corrupt: decodes to {end} of the {declared} samples its header declares")
    audio = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if keep and len(audio) > keep:
        audio, first = audio[len(audio) - keep:], end - keep
    if len(audio) == 0:
        raise BadAudio("holds no audio samples")
    if not np.isfinite(audio).all():
        raise BadAudio("holds NaN or infinite samples")
    return audio, rate, first


def resampled_length(n_samples: int, sample_rate: int, target_rate: int) -> int:
    """Samples at target_rate for n_samples at sample_rate: ceil(n_samples * target_rate / sample_rate)."""
    return -(-n_samples * target_rate // sample_rate)


def to_mono(waveform, sample_rate: int, target_rate: int) -> np.ndarray:
    """(samples,) or (samples, channels) at any rate -> float32 mono (samples',) at target_rate. Needs no codec,
    so prepare_audio.py runs it in worker processes."""
    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim == 2 and wav.shape[1] > max(16, wav.shape[0]):
        raise ValueError(f"audio of shape {wav.shape} looks like (channels, samples); pass (samples, channels)")
    wav = downmix(wav)
    if wav.ndim != 1:
        raise ValueError(f"expected audio of shape (samples,) or (samples, channels), got {wav.shape}")
    n_in = len(wav)
    if sample_rate != target_rate and n_in:
        import soxr
        wav = soxr.resample(wav, sample_rate, target_rate, quality="HQ").astype(np.float32)
        # soxr rounds the length; make it ceil(n * rate / sample_rate) (at most one sample more or less) so a
        # file's frame count is exactly ceil(duration / frame), whatever its rate
        n_out = resampled_length(n_in, sample_rate, target_rate)
        wav = np.pad(wav[:n_out], (0, max(0, n_out - len(wav))))
    return np.ascontiguousarray(wav)


# -----------------------------------------------------------------------------
# SNAC's decoder noise, seeded

def _mix(*words: int) -> int:
    """splitmix64 over the words -> a 32-bit seed (torch's CPU generator uses only the low 32 bits of its seed)."""
    m, h = (1 << 64) - 1, 0
    for w in words:
        h = ((h ^ w) + 0x9E3779B97F4A7C15) & m
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m
        h ^= h >> 31
    return h & 0xFFFFFFFF


def frame_noise(seed: int, block: int, first: int, n_frames: int, per_frame: int) -> torch.Tensor:
    """Standard normal noise (n_frames * per_frame,) float32 on the CPU for frames [first, first + n_frames) of a
    stream: each frame's values depend on (seed, block, frame) alone, so any chunking of the stream draws the same."""
    g, out = torch.Generator(), torch.empty(n_frames, per_frame)
    for f in range(n_frames):
        g.manual_seed(_mix(seed, block, first + f))
        torch.randn(per_frame, generator=g, out=out[f])
    return out.reshape(-1)


class SeededNoise(torch.nn.Module):
    """SNAC's NoiseBlock (x + noise * linear(x)) with its noise from frame_noise instead of the global RNG: the same
    seed gives the same audio, a stream decoded in chunks gets the noise of one pass, and the global RNG is untouched.
    The noise is the same for every row of a batch, so how rows are grouped into codec calls does not change it."""

    def __init__(self, linear: torch.nn.Module, block: int):
        super().__init__()
        self.linear, self.block = linear, block  # `linear`: the NoiseBlock's name, so its weights load unchanged
        self.seed, self.first, self.n_frames = 0, 0, 1  # set by AudioTokenizer.decode_codes before each call

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) with T a whole number of frames
        noise = frame_noise(self.seed, self.block, self.first, self.n_frames, x.shape[-1] // self.n_frames)
        if x.is_cuda:  # from pinned memory the copy is queued and the host goes on launching the codec's kernels
            noise = noise.pin_memory()
        return x + noise.to(x.device, non_blocking=x.is_cuda).to(x.dtype) * self.linear(x)


def seed_decoder_noise(codec: torch.nn.Module) -> list[SeededNoise]:
    """Replace every NoiseBlock of a SNAC model by a SeededNoise holding the same weights; returns them in order."""
    blocks = []
    for name, module in list(codec.named_modules()):
        if type(module).__name__ == "NoiseBlock":
            parent, _, child = name.rpartition(".")
            blocks.append(SeededNoise(module.linear, len(blocks)))
            setattr(codec.get_submodule(parent), child, blocks[-1])
    return blocks


# -----------------------------------------------------------------------------
# SNAC: waveforms <-> codes per level <-> token ids of the layout

class AudioTokenizer:
    """A SNAC codec, optionally a tiktoken text encoding, and the layout: waveform <-> token ids, text <-> ids."""

    def __init__(self, codec, name: str, text=None):
        self.codec = codec.eval()
        self.noise = seed_decoder_noise(self.codec)
        self.voices: tuple[str, ...] = ()  # a loaded model's trained speakers (speech.load_model)
        self.noise_seed = 0  # the decoder's noise derives from it (generate.py's --seed): same seed, same audio
        self.name = name  # Hub id or local folder it came from
        self.text = text  # a tiktoken Encoding, or None for the audio-only layout
        self.layout = Layout(tuple(int(s) for s in codec.vq_strides), int(codec.codebook_size),
                             text.name if text else "", text.n_vocab if text else 0)
        self.sample_rate = int(codec.sampling_rate)
        self.frame_hop = int(codec.hop_length) * codec.vq_strides[0]  # samples per frame: 2048 at 24 kHz
        # SNAC pads its input to a multiple of this; chunk edges go on multiples of it so chunks see what one pass sees
        self.pad_unit = int(codec.hop_length) * math.lcm(codec.vq_strides[0], codec.attn_window_size or 1)

    @cached_property
    def text_bytes(self) -> np.ndarray:
        """Bytes of each text id (see text_token_bytes); > 0 exactly for the ids sampling may write."""
        return text_token_bytes(self.text)

    def encode_text(self, text: str) -> np.ndarray:
        """A string -> text ids (int64); special-token strings such as <|endoftext|> are plain text here."""
        return np.array(self.text.encode_ordinary(text), dtype=np.int64)

    def decode_text(self, ids) -> str:
        """Text ids -> string (ids outside the text range are dropped; broken UTF-8 becomes U+FFFD)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.layout.text_vocab]
        return self.text.decode(ids)

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device

    @property
    def tokens_per_second(self) -> float:
        return self.sample_rate / self.frame_hop * self.layout.frame_size

    def meta(self) -> dict:
        return {"codec": self.name, "sample_rate": self.sample_rate, "frame_hop": self.frame_hop,
                "tokens_per_second": self.tokens_per_second, **self.layout.meta()}

    def to_mono(self, waveform, sample_rate: int) -> torch.Tensor:
        """(samples,) or (samples, channels) at any rate -> float32 mono (samples',) at the codec rate."""
        return torch.from_numpy(to_mono(waveform, sample_rate, self.sample_rate))

    def resampled_length(self, n_samples: int, sample_rate: int) -> int:
        return resampled_length(n_samples, sample_rate, self.sample_rate)

    def n_frames(self, n_samples: int) -> int:
        return -(-n_samples // self.frame_hop)

    def chunk_samples(self, chunk_seconds: float) -> int:
        """The samples a chunk keeps: chunk_seconds rounded to whole pad_units (at least one)."""
        return max(1, round(chunk_seconds * self.sample_rate / self.pad_unit)) * self.pad_unit

    def chunk_plan(self, n: int, chunk_seconds: float = 60.0,
                   margin_seconds: float = ENCODE_MARGIN_SECONDS) -> list[tuple[int, int, int, int]]:
        """How n samples go through the codec: (a, b, f0, nf) per chunk, in order: the codec encodes samples [a, b)
        and frames [f0, f0 + nf) of its codes are kept.

        Long audio goes through the codec in chunks so memory stays bounded. Each chunk is encoded with
        `margin_seconds` of real audio on both sides and only its middle is kept; chunk starts and margins are
        multiples of pad_unit, so the codec sees the same frame grid as in one pass over the whole file.
        """
        unit, chunk = self.pad_unit, self.chunk_samples(chunk_seconds)
        margin = math.ceil(margin_seconds * self.sample_rate / unit) * unit
        plan = []
        for start in range(0, n, chunk):
            a, b = max(0, start - margin), min(n, start + chunk + margin)
            plan.append((a, b, (start - a) // self.frame_hop, self.n_frames(min(chunk, n - start))))
        return plan

    @torch.inference_mode()
    def encode_many(self, audios: list, chunk_seconds: float = 60.0, margin_seconds: float = ENCODE_MARGIN_SECONDS,
                    batch_seconds: float = 0.0) -> list[list[torch.Tensor]]:
        """Several mono clips at the codec rate [(samples,) each, numpy or tensors] -> for each, its codes per level
        (n_frames * codes_per_frame[l],) on the codec's device, exactly as encode_codes gives them one by one.

        The chunks of all clips (chunk_plan) are grouped by their length rounded up to pad_unit, and each group goes
        through the codec in batches of up to batch_seconds of audio (default: chunk_seconds), the margins not
        counted. SNAC pads every input with zeros up to that same length and has no layer that mixes the rows of a
        batch, so a chunk's codes do not depend on the chunks it shares a call with (up to the rounding of batched
        kernels). On CUDA nothing here waits for the GPU (codes_to_host's function does), so the host can prepare the
        next clips meanwhile.
        """
        unit, cuda = self.pad_unit, self.device.type == "cuda"
        budget = round((batch_seconds or chunk_seconds) * self.sample_rate)
        # the margins are not counted: 60 s chunks and 240 s batches make 4 chunks per call, not 3 (61.5 s each)
        chunk = self.chunk_samples(chunk_seconds)
        chunks: dict[int, list[tuple[int, int, int, int]]] = {}  # padded length -> [(clip, chunk, a, b)]
        plans = [self.chunk_plan(int(x.shape[-1]), chunk_seconds, margin_seconds) for x in audios]
        for i, plan in enumerate(plans):
            for j, (a, b, _, _) in enumerate(plan):
                chunks.setdefault(-(-(b - a) // unit) * unit, []).append((i, j, a, b))
        out: dict[tuple[int, int], list[torch.Tensor]] = {}  # (clip, chunk) -> codes per level of that chunk
        for length, group in chunks.items():
            per_call = max(1, budget // min(length, chunk))
            for first in range(0, len(group), per_call):
                calls = group[first:first + per_call]
                x = torch.zeros((len(calls), length), dtype=torch.float32, pin_memory=cuda)  # (B, samples)
                for row, (i, _, a, b) in enumerate(calls):
                    x[row, :b - a] = torch.as_tensor(audios[i][a:b])
                codes = self.codec.encode(x.to(self.device, non_blocking=True)[:, None])  # SNAC wants (B, 1, samples)
                for row, (i, j, _, _) in enumerate(calls):
                    out[i, j] = [c[row] for c in codes]
        result = []
        for i, plan in enumerate(plans):
            per_level = [[out[i, j][level][f0 * k:(f0 + nf) * k] for j, (_, _, f0, nf) in enumerate(plan)]
                         for level, k in enumerate(self.layout.codes_per_frame)]
            codes = [torch.cat(c) if c else torch.zeros(0, dtype=torch.long, device=self.device) for c in per_level]
            n_frames = self.n_frames(int(audios[i].shape[-1]))
            assert all(c.shape[0] == n_frames * k for c, k in zip(codes, self.layout.codes_per_frame)), \
                f"chunked encode gave {[c.shape for c in codes]} for {n_frames} frames"
            result.append(codes)
        return result

    def codes_to_host(self, encoded: list[list[torch.Tensor]]) -> Callable[[], list[list[np.ndarray]]]:
        """Start copying encode_many's codes to the host now; the returned function waits for them and gives them
        as numpy arrays. On CUDA the copies are queued right behind these codec calls, so that function waits for
        them only: a plain .cpu() would also wait for whatever was queued since (prepare_audio.py launches the next
        files first), and the GPU would stand idle while the host finishes these and launches more."""
        cuda = self.device.type == "cuda"
        # non_blocking only where an event then waits for them (a copy from an Apple GPU would be asynchronous too)
        host = [[c.to("cpu", non_blocking=cuda) for c in codes] for codes in encoded]  # pinned memory on CUDA
        done = None
        if cuda:
            # blocking: the waiting thread sleeps rather than spins, leaving its core to the decoding workers
            done = torch.cuda.Event(blocking=True)
            done.record(torch.cuda.current_stream(self.device))

        def wait() -> list[list[np.ndarray]]:
            if done is not None:
                done.synchronize()
            return [[c.numpy() for c in codes] for codes in host]
        return wait

    def encode_codes(self, audio: torch.Tensor, chunk_seconds: float = 60.0,
                     margin_seconds: float = ENCODE_MARGIN_SECONDS) -> list[torch.Tensor]:
        """Mono audio (samples,) at the codec rate -> codes per level, (n_frames * codes_per_frame[l],) each,
        chunk by chunk (see chunk_plan)."""
        return self.encode_many([audio], chunk_seconds, margin_seconds)[0]

    def encode(self, waveform, sample_rate: int, chunk_seconds: float = 60.0,
               margin_seconds: float = ENCODE_MARGIN_SECONDS) -> np.ndarray:
        """Audio (samples,) or (samples, channels) at any rate -> int64 token ids, ceil(duration / frame) frames."""
        audio = self.to_mono(waveform, sample_rate)
        codes = self.encode_codes(audio, chunk_seconds=chunk_seconds, margin_seconds=margin_seconds)
        return self.layout.codes_to_tokens([c.cpu().numpy() for c in codes])

    @torch.inference_mode()
    def decode_codes(self, codes: list[torch.Tensor], first_frame: int = 0) -> torch.Tensor:
        """Codes [(B, n_frames * k_l) per level] on any device -> (B, n_frames * frame_hop) float32 audio.
        first_frame: where these frames start in the stream they belong to, which places the decoder's noise."""
        n_frames = codes[0].shape[-1] // self.layout.codes_per_frame[0]
        # codecs with local attention need whole attention windows: pad with code 0, trim the audio after
        frames_per_unit = self.pad_unit // self.frame_hop
        pad = -n_frames % frames_per_unit
        if pad:
            codes = [torch.nn.functional.pad(c, (0, pad * k)) for c, k in zip(codes, self.layout.codes_per_frame)]
        for block in self.noise:
            block.seed, block.first, block.n_frames = self.noise_seed, first_frame, n_frames + pad
        audio = self.codec.decode([c.to(self.device) for c in codes])  # (B, 1, samples)
        return audio[:, 0, : n_frames * self.frame_hop].float()

    def decode(self, tokens) -> np.ndarray:
        """Token ids (any 1-D stream, repaired first) -> float32 audio at sample_rate, whole frames."""
        tokens = self.layout.repair(np.asarray(tokens))
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.float32)
        codes = self.layout.tokens_to_codes(torch.from_numpy(tokens)[None])
        return self.decode_codes(codes)[0].cpu().numpy()


def load_codec(codec: str = DEFAULT_CODEC, device: str = "cpu", weights: bool = True,
               text_encoding: str = "") -> AudioTokenizer:
    """Load a SNAC codec from a Hugging Face Hub id or a local folder holding config.json + pytorch_model.bin,
    and the tiktoken encoding named text_encoding ("" = none: the audio-only layout).

    weights=False reads config.json alone and builds the codec on the meta device: its rates, layout and meta()
    are real, but it cannot encode or decode (for codes that are already tokenised)."""
    text = load_text_encoding(text_encoding) if text_encoding else None
    with warnings.catch_warnings():
        # snac's @torch.jit.script draws torch's deprecation warning at import, which would break our one-line errors
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script")
        from snac import SNAC
    if os.path.isdir(codec):  # recorded by its absolute path, so meta.json and checkpoints find it from anywhere
        config_path, weights_path = os.path.join(codec, "config.json"), os.path.join(codec, "pytorch_model.bin")
        for p in (config_path, weights_path)[:1 + weights]:
            if not os.path.isfile(p):
                raise ValueError(f"codec folder {codec}: missing {os.path.basename(p)} (expected config.json + "
                                 "pytorch_model.bin)")
    elif os.path.exists(codec) or codec.startswith((".", "/")) or codec.count("/") != 1:
        raise ValueError(f"codec '{codec}': not a folder and not a Hub id like '{DEFAULT_CODEC}'")
    else:
        from huggingface_hub import hf_hub_download
        try:
            config_path = hf_hub_download(repo_id=codec, filename="config.json")
            weights_path = hf_hub_download(repo_id=codec, filename="pytorch_model.bin") if weights else ""
        except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
            raise ValueError(
                f"codec '{codec}': cannot download it from the Hugging Face Hub ({type(e).__name__}). Without "
                f"internet, copy its config.json and pytorch_model.bin into a folder and pass --codec=<that folder>"
            ) from None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        with torch.device("cpu" if weights else "meta"):
            model = SNAC(**config)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"codec config {config_path}: not a SNAC config ({e})") from None
    name = os.path.abspath(codec) if os.path.isdir(codec) else codec
    if not weights:
        return AudioTokenizer(model, name, text)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"codec weights {weights_path}: cannot be loaded into SNAC ({first[:200]})") from None
    return AudioTokenizer(model.to(device).eval(), name, text)


def wav_stream_header(sample_rate: int) -> bytes:
    """The header of a 16-bit mono WAV of unknown length: both sizes at their maximum, as sox and ffmpeg write to
    pipes; players read until the stream ends."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 0xFFFFFFFF, b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                       2 * sample_rate, 2, 16, b"data", 0xFFFFFFFF)


def pcm16(audio: np.ndarray) -> bytes:
    """Float samples -> little-endian 16-bit PCM as libsndfile 1.2 writes PCM_16: floor(x * 32768), clipped."""
    return np.clip(np.floor(audio * 32768), -32768, 32767).astype("<i2").tobytes()


class WavWriters:
    """16-bit mono WAV files written as audio arrives: one per sample (and per continuation when there is a
    prompt), appended to under temp names beside the final ones and renamed into place by close(); on any error
    every temp file is removed (never half a file). pipe: also stream sample 0 there as an open-ended WAV."""

    def __init__(self, paths: list[str], cont_paths: list[str], sample_rate: int, prompt_samples: int,
                 pipe: BinaryIO | None = None):
        import soundfile as sf
        self.paths, self.cont_paths, self.prompt_samples, self.pipe = paths, cont_paths, prompt_samples, pipe
        self.tmps = [f"{p}.{os.getpid()}.tmp" for p in paths + cont_paths]
        self.files = []
        for tmp, path in zip(self.tmps, paths + cont_paths):
            try:
                self.files.append(sf.SoundFile(tmp, "w", samplerate=sample_rate, channels=1, format="WAV",
                                               subtype="PCM_16"))
            except (RuntimeError, OSError) as e:  # libsndfile's errors are RuntimeErrors; a full disk, say
                self.__exit__(type(e), e, None)
                raise write_failed(path, e) from None
        self.written = 0  # samples written to each sample_<i>.wav so far
        if pipe is not None:
            pipe.write(wav_stream_header(sample_rate))

    def write(self, audio: np.ndarray, limits: list[int] | None = None) -> None:
        """Audio (B, samples) that follows what was written; the continuation files skip the prompt's samples.
        limits: samples each row holds in all (a row whose audio ended), None = no limit."""
        start = max(0, self.prompt_samples - self.written)  # where the continuation starts inside this piece
        rows = [row[:max(0, limits[i] - self.written)] if limits else row for i, row in enumerate(audio)]
        for i, row in enumerate(rows):
            try:
                self.files[i].write(row)
                if self.cont_paths and start < len(row):
                    self.files[len(self.paths) + i].write(row[start:])
            except (RuntimeError, OSError) as e:  # libsndfile says "System error." for a full disk: say which file
                raise write_failed(self.paths[i], e, 2 * len(row)) from None
        self.written += audio.shape[1]
        if self.pipe is not None:
            self.pipe.write(pcm16(rows[0]))
            self.pipe.flush()

    def __enter__(self) -> "WavWriters":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = None
        for f, path in zip(self.files, self.paths + self.cont_paths):
            try:
                f.close()  # writes the header's sizes
            except (RuntimeError, OSError) as e:
                failed = failed or write_failed(path, e)
        for tmp, path in zip(self.tmps, self.paths + self.cont_paths):
            if exc_type is None and failed is None:
                os.replace(tmp, path)
            elif os.path.exists(tmp):
                os.remove(tmp)
        if exc_type is None and failed is not None:
            raise failed
