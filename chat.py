"""A spoken conversation in the terminal with a chat model (configs/chat.py): type a line, or the path of an audio
file; the model answers in text, then speech, and every reply is written to out_dir as a WAV.

    python chat.py --ckpt=out/chat/best.pt
    python chat.py --ckpt=out/chat/best.pt --system="Answer in one sentence." --out_dir=replies
    printf 'Hello there.\\nquestion.wav\\nThank you.\\n' | python chat.py --ckpt=out/chat/best.pt   # turns from a pipe
    python chat.py --ckpt=out/chat/best.pt --codec=snac_24khz_folder --device=cpu   # offline: a local codec copy
    pip install sounddevice && python chat.py --ckpt=out/chat/best.pt   # an empty line records; replies play
    python chat.py --help

Each reply prints its text as it is written, then its WAV file, its length, the time to first audio (from the end of
the user's turn to the first reply samples decoded) and its real-time factor. The conversation is the context of
every reply and stays in the model's KV cache, so a reply runs the model on the new turn only; when the conversation
no longer leaves room for a reply, its oldest whole turns leave (a system turn stays) and the cache is refilled once.
Ctrl-D or an empty pipe ends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from codec import BadAudio, WavWriters, read_audio
from common import UserError, pick_device, run_main, user_errors
from config import parse_config
from sampling import DECODE_FRAMES, PrefixCache, StreamDecoder, cut_at_end, sample_frames, stream_text
from sources import audio_extensions
import speech
from tokenizer import CHAT_LAYOUT_NAME


@dataclass
class ChatConfig:
    ckpt: str = "out/chat/ckpt.pt"  # a chat checkpoint (.pt), an export.py folder or a Hub model id
    codec: str = ""  # Hub id or local folder; "" = the codec named in the checkpoint's meta
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    out_dir: str = "replies"  # reply_<n>.wav, one per reply
    system: str = ""  # a system turn that opens the conversation (and never leaves it)
    max_text: int = 64  # text tokens per reply at most
    seconds: float = 10.0  # speech per reply at most
    temperature: float = 0.8  # for the reply's speech; 0 = greedy
    text_temperature: float = 0.0  # for the reply's text; 0 = greedy
    top_k: int = 0  # keep only the k most likely ids; 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    seed: int = 1337  # same seed, same replies on the same device
    sound: bool = True  # with the sounddevice package: an empty line records from the microphone, replies play


def load_chat_model(cfg: ChatConfig, device: str):
    with user_errors():
        model, tok = speech.load_model(cfg.ckpt, cfg.codec, device, "float32", "chat.py", cfg.seed)
    if not tok.layout.chat:
        raise UserError(f"checkpoint {cfg.ckpt}: layout {tok.layout.name} has no role tokens; chat needs a model "
                        f"fine-tuned on conversations ({CHAT_LAYOUT_NAME}: train.py configs/chat.py)")
    return model, tok


def user_turn(line: str, tok) -> tuple:
    """A typed line -> a text turn; the path of an audio file -> an audio turn (its SNAC ids)."""
    if line.rsplit(".", 1)[-1].lower() in audio_extensions() and os.path.isfile(line):
        try:
            wav, rate = read_audio(line)
        except BadAudio as e:
            raise UserError(f"audio {line}: {e}") from None
        return "user", None, tok.encode(tok.to_mono(wav, rate).numpy(), tok.sample_rate).astype(np.int64)
    return "user", tok.encode_text(line), None


def sound_devices(wanted: bool) -> tuple:
    """(sounddevice, can record, can play): a microphone and speakers where the optional sounddevice package and
    PortAudio find them; (None, False, False) elsewhere, and then chat.py types, reads files and writes WAVs."""
    try:
        import sounddevice as sd
    except (ImportError, OSError):  # not installed, or PortAudio missing
        return None, False, False
    found = []
    for kind in ("input", "output"):
        try:
            found.append(wanted and bool(sd.query_devices(kind=kind)))
        except (ValueError, sd.PortAudioError):
            found.append(False)
    return sd, *found


def record(sd, sample_rate: int) -> np.ndarray:
    """Mono float32 audio from the default microphone, from now until Enter."""
    chunks: list[np.ndarray] = []
    with sd.InputStream(samplerate=sample_rate, channels=1, dtype="float32",
                        callback=lambda data, *_: chunks.append(data[:, 0].copy())):
        input("recording: press Enter to stop ")
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def main() -> None:
    with user_errors():
        cfg = parse_config(ChatConfig, sys.argv[1:], __doc__)
    if cfg.max_text < 1 or not 0 < cfg.seconds <= 600 or cfg.temperature < 0 or cfg.text_temperature < 0:
        raise UserError("max_text must be >= 1, seconds in (0, 600], temperature and text_temperature >= 0")
    print("config:", json.dumps(dataclasses.asdict(cfg)), flush=True)
    device = pick_device(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    model, tok = load_chat_model(cfg, device)
    layout, fs, hop, sr = tok.layout, tok.layout.frame_size, tok.frame_hop, tok.sample_rate
    block_size = model.config.block_size
    n_frames = math.ceil(cfg.seconds * sr / hop)
    text_ok = torch.from_numpy(tok.text_bytes > 0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    knobs = dict(top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
    turns: list[tuple] = [("system", tok.encode_text(cfg.system), None)] if cfg.system else []
    cache = PrefixCache(model)  # the conversation so far stays in the KV cache: a reply runs only the new turn
    interactive = sys.stdin.isatty()
    sd, can_record, can_play = sound_devices(cfg.sound)
    if interactive and can_record:
        print("an empty line records from the microphone (Enter again stops)", flush=True)
    n = 0
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.strip()
        heard = record(sd, sr) if not line and interactive and can_record else None
        if not line and (heard is None or len(heard) < hop):
            continue
        t_end = time.perf_counter()  # the end of the user's turn
        turns.append(user_turn(line, tok) if heard is None else ("user", None, tok.encode(heard, sr).astype(np.int64)))
        # room for the reply: its text, TEXT_END + AUDIO_START, and at least a second of speech
        want = cfg.max_text + 2 + min(n_frames, math.ceil(sr / hop)) * fs
        kept = layout.fit_turns(turns, want, block_size)
        if len(kept) < len(turns):
            print(f"note: the conversation fills the model's context; its oldest {len(turns) - len(kept)} turn(s) "
                  "left it", file=sys.stderr, flush=True)
        turns = kept
        context = torch.from_numpy(layout.chat_context(turns))
        text: list[int] = []
        print("assistant: ", end="", flush=True)
        for ids in stream_text(model, layout, context, min(cfg.max_text, block_size - len(context) - 2 - fs), text_ok,
                               temperature=cfg.text_temperature, prefix=cache, **knobs):
            shown = tok.decode_text(text)
            text += ids
            piece = tok.decode_text(text)[len(shown):]
            print(piece if shown.strip() else piece.lstrip(), end="", flush=True)  # as it is written
        print(flush=True)
        sp = layout.special_tokens
        spoken = torch.cat([context, torch.tensor([*text, sp["text_end"], sp["audio_start"]])])
        frames_left = min(n_frames, (block_size - len(spoken)) // fs)  # the window must not slide past the turns
        path = os.path.join(cfg.out_dir, f"reply_{n}.wav")
        dec, t_first, frames = StreamDecoder(tok, DECODE_FRAMES), None, []
        speaker = sd.OutputStream(samplerate=sr, channels=1, dtype="float32") if can_play else contextlib.nullcontext()
        with WavWriters([path], [], sr, 0) as out, speaker:
            def write(audio: torch.Tensor | None) -> None:
                nonlocal t_first
                if audio is not None:  # the decoder lags the sampler: a row's end is known before its audio
                    ends = [(e if e is not None else 1 << 40) * hop for e in dec.ends]
                    audio = audio.cpu().numpy()
                    heard_now = audio[0, :max(0, ends[0] - out.written)]
                    out.write(audio, ends)
                    t_first = t_first or time.perf_counter()
                    if can_play:  # as it is made: the write waits while the device's buffer is full
                        speaker.write(heard_now[:, None])
            for frame in sample_frames(model, layout, None, max(1, frames_left), context=spoken,
                                       temperature=cfg.temperature, prefix=cache, **knobs):
                frames.append(frame)
                write(dec.push(frame))
            write(dec.flush())
        t_done = time.perf_counter()
        tokens, kept = cut_at_end(torch.cat(frames, dim=1), layout)
        speech = tokens[0, :int(kept[0]) * fs].cpu().numpy()
        seconds = len(speech) // fs * hop / sr
        print(f"{path}: {seconds:.2f} s | time to first audio {(t_first - t_end) * 1000:.0f} ms | real-time "
              f"factor {seconds / (t_done - t_end):.2f}x", flush=True)
        turns.append(("assistant", np.asarray(text, dtype=np.int64), speech if len(speech) else None))
        n += 1


if __name__ == "__main__":
    run_main(main)
