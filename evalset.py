"""What a TTS eval speaks: the rows of the published test lists, and the speech a model makes for each.

    rows, bad, fmt = read_list("seedtts_testset/en/meta.lst")   # or LibriSpeech-PC's list, or one sentence a line
    audio = speak(model, tok, rows[0].text, ref_tokens, rows[0].ref_text, max_seconds=20)   # float32 at tok's rate

The lists, as their authors publish them:
- Seed-TTS-eval `meta.lst`: `id|prompt text|prompt wav|target text[|target wav]`, wav paths relative to the list;
- F5-TTS's LibriSpeech-PC cross-sentence list (librispeech_pc_test_clean_cross_sentence.lst): tab-separated
  `ref_utt, ref_dur, ref_txt, gen_utt, gen_dur, gen_txt`, each utterance at `<root>/<spk>/<chapter>/<utt>.flac`
  of LibriSpeech test-clean (root: the list's folder unless given);
- a plain text file: one sentence a line, no reference voice.
A row that does not parse, names a missing file or has no text is returned in `bad` ("file:line: what") and left out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from codec import AudioTokenizer
from sampling import cut_at_end, decode_in_chunks, sample_frames
from speech import audio_tokens, transcribe_tokens

FORMATS = ("seedtts", "librispeech_pc", "sentences")
MIN_TEXT_TOKENS = 64  # room a transcription leaves for the text the model writes (at most a quarter of the context)


@dataclass
class Row:
    id: str
    text: str  # what the model is asked to say
    ref_wav: str = ""  # the voice to hold (an audio prompt); "" = none
    ref_text: str = ""  # what ref_wav says
    target_wav: str = ""  # a recording of `text` by the reference speaker, where the list has one
    where: str = ""  # file:line, for messages


# what train.py's eval_asr speaks without an eval_list: Harvard sentences (IEEE 1969), phonetically balanced
SENTENCES = [Row(f"harvard{i}", text) for i, text in enumerate((
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage."))]


def spoken_rows(eval_asr: str, eval_list: str, meta: dict, data: str) -> tuple[list[Row] | None, list[str]]:
    """train.py's eval_asr/eval_list for a dataset (meta, named `data` in errors) -> (the rows its eval samples
    speak, None for the built-in sentences or no eval_asr; the bad rows skipped). ValueError when they cannot be."""
    if not eval_asr:
        return None, []
    if not meta.get("text_encoding"):
        raise ValueError(f"eval_asr={eval_asr}: {data} holds audio only; spoken samples need a text+audio dataset "
                         "(prepare_audio.py with transcripts), or drop eval_asr")
    if not eval_list:
        return None, []
    if not os.path.isfile(eval_list):
        raise ValueError(f"eval_list {eval_list}: not found (a list as eval_tts.py reads, or '' for the built-in "
                         "sentences)")
    rows, bad, fmt = read_list(eval_list)
    if not rows:
        raise ValueError(f"eval_list {eval_list}: no good row ({len(bad)} bad; read as {fmt}): "
                         + "; ".join(bad[:3]))
    return rows, bad


def detect_format(lines: list[str]) -> str:
    """The list's format from its first non-empty line."""
    first = next((line for line in lines if line.strip()), "")
    if first.count("|") in (3, 4):
        return "seedtts"
    if first.count("\t") == 5:
        return "librispeech_pc"
    return "sentences"


def read_list(path: str, audio_root: str = "") -> tuple[list[Row], list[str], str]:
    """A list file -> (rows, bad rows as "file:line: what", its format). audio_root: where LibriSpeech-PC's
    utterances are (default: the list's folder); Seed-TTS paths are relative to the list, as published."""
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    fmt = detect_format(lines)
    folder = os.path.dirname(os.path.abspath(path))
    root = audio_root or folder
    rows, bad, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = parse_row(line, fmt, folder, root, n)
            row.where = where
            if not row.text.strip():
                raise ValueError("empty target text")
            if row.ref_wav and not row.ref_text.strip():
                raise ValueError("empty prompt text")
            for wav in (row.ref_wav, row.target_wav):
                if wav and not os.path.isfile(wav):
                    raise ValueError(f"audio file {wav} not found")
            if row.id in seen:
                raise ValueError(f"id {row.id} appears twice")
        except ValueError as e:
            bad.append(f"{where}: {e}")
            continue
        seen.add(row.id)
        rows.append(row)
    return rows, bad, fmt


def parse_row(line: str, fmt: str, folder: str, root: str, n: int) -> Row:
    if fmt == "seedtts":
        fields = line.split("|")
        if len(fields) not in (4, 5):
            raise ValueError(f"{len(fields)} |-separated fields; expected 4 (id|prompt text|prompt wav|target text) "
                             "or 5 (... |target wav)")
        uid, ref_text, ref_wav, text = (s.strip() for s in fields[:4])
        target = fields[4].strip() if len(fields) == 5 else ""
        if not uid or not ref_wav:
            raise ValueError("empty id or prompt wav")
        return Row(uid, text, os.path.join(folder, ref_wav), ref_text,
                   os.path.join(folder, target) if target else "")
    if fmt == "librispeech_pc":
        fields = line.split("\t")
        if len(fields) != 6:
            raise ValueError(f"{len(fields)} tab-separated fields; expected 6 (ref_utt, ref_dur, ref_txt, gen_utt, "
                             "gen_dur, gen_txt)")
        ref_utt, _, ref_text, gen_utt, _, text = (s.strip() for s in fields)
        return Row(gen_utt, text, librispeech_path(root, ref_utt), ref_text, librispeech_path(root, gen_utt))
    return Row(f"line{n}", line.strip())


def librispeech_path(root: str, utt: str) -> str:
    parts = utt.split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"utterance {utt!r}: expected LibriSpeech's <speaker>-<chapter>-<index>")
    return os.path.join(root, parts[0], parts[1], utt + ".flac")


# -----------------------------------------------------------------------------
# speech from a model, and the codec's round trip

def round_trip(tok: AudioTokenizer, audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The audio after a codec encode/decode: the best any model of these tokens can sound (the ceiling)."""
    return tok.decode(audio_tokens(tok, audio, sample_rate).numpy())


def voice_context(tok: AudioTokenizer, text: str, ref_tokens: torch.Tensor | None,
                  ref_text: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, audio prompt) that make the model say `text`, in the reference voice when there is one: a
    speech-from-text item of the reference's text then the target text, whose audio starts with the reference's,
    so the continuation is the target in that voice. The one place a row's reference enters generation."""
    words = f"{ref_text.strip()} {text.strip()}" if ref_tokens is not None else text.strip()
    return torch.from_numpy(tok.layout.speech_context(tok.encode_text(words))), ref_tokens


@torch.no_grad()
def speak(model, tok: AudioTokenizer, text: str, ref_tokens: torch.Tensor | None = None, ref_text: str = "",
          max_seconds: float = 20.0, **kwargs) -> np.ndarray:
    """The model's speech for text (float32 at tok.sample_rate), until it ends its audio or max_seconds, within
    its context (no sliding window, which would drop the text; a reference that leaves too little room keeps its
    last frames). kwargs: sample_frames' (temperature, top_k, top_p, generator, decode). A text too long for the
    context is a ValueError."""
    fs, hop, block = tok.layout.frame_size, tok.frame_hop, model.config.block_size
    context, prompt = voice_context(tok, text, ref_tokens, ref_text)
    room = (block - len(context)) // fs  # frames the text leaves
    if room < 2:
        raise ValueError(f"{len(context) - 4} text tokens leave no room for audio in the model's context of "
                         f"{block} tokens")
    wanted = max(1, round(max_seconds * tok.sample_rate / hop))
    if prompt is not None:  # the reference keeps its last frames that leave max_seconds (or half the room) to speak
        prompt = prompt[-(room - min(wanted, room // 2)) * fs:]
        room -= len(prompt) // fs
    n_frames = min(room, wanted)
    device = model.lm_head.weight.device
    frames = list(sample_frames(model, tok.layout, None if prompt is None else prompt.to(device), n_frames,
                                context=context, **kwargs))
    generated, kept = cut_at_end(torch.cat(frames, dim=1), tok.layout)
    p = torch.zeros(0, dtype=torch.long) if prompt is None else prompt
    # decoded after the reference, so the codec sees the frames before the first new one
    tokens = torch.cat([p.to(generated.device)[None], generated], dim=1)
    start = len(p) // fs * hop
    audio = decode_in_chunks(tok, tokens)[0, start:start + int(kept[0]) * hop]
    return audio.cpu().numpy()


def model_transcript(model, tok: AudioTokenizer, tokens: torch.Tensor, **kwargs) -> str:
    """What the model writes after audio (its own ASR, greedy unless kwargs say otherwise), from the first seconds
    that fit its context."""
    kwargs.setdefault("temperature", 0.0)
    return transcribe_tokens(model, tok, tokens, MIN_TEXT_TOKENS, **kwargs)[0]
