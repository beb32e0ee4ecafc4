"""What generate.py and serve.py both do with a trained model: load it with its codec, turn audio into a prompt,
and transcribe. Errors are ValueError with a message for the user; no prints.

    model, tok = load_model("out/ljspeech/best.pt", codec="", device="cpu", dtype="float32", text_for="--text")
    tokens = audio_tokens(tok, wav, rate)                  # mono samples at any rate -> ids of its whole frames
    text, heard = transcribe_tokens(model, tok, tokens, temperature=0.0)   # the model's own transcription
    context, cut = fit_clone(tok.layout, ref, ref_text, text, model.config.block_size)   # speak in ref's voice
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from checkpoints import CODEC_KEYS, LAYOUT_KEYS, check_compatible, load_model_source, tokenizer_meta
from codec import AudioTokenizer, load_codec
from model import GPT
from sampling import transcribe
from tokenizer import Layout, load_text_encoding, voice_text


@contextlib.contextmanager
def hinted(hint: str):
    """A ValueError raised inside gets `hint` appended to its message."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None


def load_model(source: str, codec: str, device: str, dtype: str, text_for: str = "",
               seed: int = 0, voice: str = "") -> tuple[GPT, AudioTokenizer]:
    """A checkpoint, export folder or Hub id and its codec (codec "" = the one its meta names), checked to match,
    the model in eval mode on device in dtype. text_for: what needs the model's text encoding, named in the error
    when it cannot be loaded ("" = audio only: a text+audio model's audio ids are still placed after its text ids).
    seed: the codec decoder's noise seed. voice: a trained speaker the caller will ask for, checked here (the
    model's voices are on the returned tokenizer, tok.voices)."""
    ckpt = load_model_source(source)
    meta = tokenizer_meta(ckpt, source)
    layout = Layout.from_meta(meta)
    given, codec = codec, codec or meta.get("codec")
    if not codec:
        raise ValueError(f"checkpoint {source}: its meta names no codec; pass --codec=<Hub id or local folder>")
    text_encoding = layout.text_encoding if text_for else ""
    if text_encoding:
        with hinted(f" (needed for {text_for})"):
            load_text_encoding(text_encoding)  # its own error first (tiktoken keeps it loaded for load_codec)
    hint = "" if given else (" (the codec the checkpoint was trained with; pass --codec=<Hub id, or a folder with "
                             "config.json + pytorch_model.bin> to use a copy of it)")
    with hinted(hint):
        tok = load_codec(codec, device=device, text_encoding=text_encoding)
    # the prompt's and the samples' ids are the codec's: they must be the ones the model was trained on
    with hinted("; pass the checkpoint's codec with --codec"):
        ours = f"codec {codec}" + (f" + text encoding '{text_encoding}'" if text_encoding else "")
        # without its text encoding a text+audio model's codes are still checked, and its own layout is taken
        # a chat model's layout adds role tokens after the codec's text+audio ids: its codes and text are checked
        audio_only = bool(layout.text_encoding) and not text_encoding
        keys = CODEC_KEYS if audio_only else (*CODEC_KEYS, "text_encoding") if layout.chat else LAYOUT_KEYS
        check_compatible(meta, tok.meta(), f"checkpoint {source}", ours, keys)
        if audio_only or layout.chat:
            tok.layout = layout  # with text, audio ids come after the text ids; the role tokens after both
    tok.voices = tuple(meta.get("voices") or ())
    if voice:
        with hinted(f"; pass one of them, or no voice (checkpoint {source})"):
            voice_text("", voice, list(tok.voices))
    tok.noise_seed = seed  # SNAC's decoder adds noise: seeded, so the same seed writes the same WAV bytes
    model = GPT.from_checkpoint(ckpt).to(device).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))  # inference only: half-precision weights, no per-step autocast casts
    return model, tok


def audio_tokens(tok: AudioTokenizer, wav: np.ndarray, rate: int) -> torch.Tensor:
    """Mono float32 samples at `rate` -> the ids of their whole frames at the codec's rate (at least one frame): a
    partial last frame would be padded with silence, and a model continuing it would continue that silence."""
    n_frames = max(1, tok.resampled_length(len(wav), rate) // tok.frame_hop)
    audio = tok.to_mono(wav, rate)[:n_frames * tok.frame_hop]
    return torch.from_numpy(tok.encode(audio.numpy(), tok.sample_rate))


def transcribe_tokens(model: GPT, tok: AudioTokenizer, audio: torch.Tensor, min_text: int = 64,
                      **kwargs) -> tuple[str, int]:
    """Audio ids (whole frames) -> (the text the model writes after them, how many of the ids it heard: all, or the
    first whole frames that fit the model's context with room for min_text text tokens). kwargs: transcribe's
    (temperature, top_k, top_p, generator)."""
    layout, fs, block_size = tok.layout, tok.layout.frame_size, model.config.block_size
    if not layout.text_vocab:
        raise ValueError(f"the model is trained on audio only (layout {layout.name}): transcription needs a model "
                         "trained on text+audio data")
    min_text = min(min_text, block_size // 4)
    fit = (block_size - len(layout.transcript_context(np.zeros(0, np.int64))) - min_text) // fs * fs
    audio = audio[:fit]  # the window must not slide, or the model would lose the audio it transcribes
    max_tokens = block_size - len(layout.transcript_context(audio.numpy()))
    ids = transcribe(model, layout, audio, max_tokens, torch.from_numpy(tok.text_bytes > 0), **kwargs)
    return " ".join(tok.decode_text(ids).split()), len(audio)


def fit_clone(layout: Layout, ref: np.ndarray, ref_text, text, block_size: int) -> tuple[np.ndarray, int]:
    """Layout.clone_context in a block_size context -> (the context, frames dropped from the reference's start):
    the reference keeps its last whole frames that leave half of the rest of the context for the new audio (the
    window must not slide past the texts). ValueError when the texts leave no room for audio."""
    fs, empty = layout.frame_size, np.zeros(0, np.int64)
    room = block_size - len(layout.clone_context(empty, ref_text, text))
    if room < 4 * fs:
        raise ValueError(f"{len(ref_text) + len(text)} text tokens leave no room for audio in the model's context of "
                         f"{block_size} tokens")
    keep = room // 2 // fs * fs
    cut = max(0, len(ref) - keep)
    return layout.clone_context(np.asarray(ref)[cut:], ref_text, text), cut // fs
