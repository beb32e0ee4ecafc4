"""Conversations for chat fine-tuning: a folder of .jsonl files, one conversation a line, read into turns whose
audio is a file (relative to the .jsonl file), base64 bytes or SNAC codes. prepare_audio.py encodes the audio and
writes each conversation with Layout.conversation (role tokens, a loss mask on the assistant turns).

    from chats import read_jsonl
    for line, turns, error in read_jsonl("chats/part-0.jsonl"):   # turns: [Turn(role, text, audio)], or an error
        ...

A line: {"messages": [{"role": "user", "audio": "clips/q1.wav"}, {"role": "assistant", "text": "Paris.",
"audio": {"codes": [...]}}]}. Roles are system, user, assistant; a turn holds text, audio or both (an assistant
turn both: it says what it writes); audio is a path, {"path": ...}, {"bytes": <base64>} or {"codes": [...]} (SNAC
codes, flattened depth-first, as a codes column holds them). OpenAI-style content lists are read too: "content" as
a string, or a list of {"type": "text", "text"} and {"type": "input_audio", "input_audio": {"data": <base64>}} parts.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Iterator

from tokenizer import CHAT_TOKENS


@dataclass(frozen=True)
class Turn:
    role: str  # system, user or assistant
    text: str | None  # what it says in text, if anything
    audio: tuple | None  # ("file", path) | ("bytes", bytes) | ("codes", list of ints), if it speaks


def _audio(value, base: str) -> tuple:
    if isinstance(value, str):
        return "file", os.path.join(base, value)
    if isinstance(value, dict):
        if isinstance(value.get("codes"), list):
            return "codes", value["codes"]
        if isinstance(value.get("bytes"), str) or isinstance(value.get("data"), str):
            try:
                return "bytes", base64.b64decode(value.get("bytes") or value.get("data"), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("audio bytes are not base64") from None
        if isinstance(value.get("path"), str):
            return "file", os.path.join(base, value["path"])
    raise ValueError(f"audio {str(value)[:60]!r}: expected a path, {{\"path\"}}, {{\"bytes\": base64}} or "
                     "{\"codes\": [...]}")


def parse_message(m, where: str, base: str) -> Turn:
    """One message ({"role", "text"/"audio" or "content"}) -> its turn; where names it in the ValueError."""
    if not isinstance(m, dict) or m.get("role") not in CHAT_TOKENS:
        raise ValueError(f"{where}: role {m.get('role') if isinstance(m, dict) else m!r} is not one of "
                         f"{', '.join(CHAT_TOKENS)}")
    text, audio = m.get("text"), m.get("audio")
    content = m.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text = part["text"] if text is None else f"{text} {part['text']}"
            elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
                audio = part["input_audio"]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: text is {type(text).__name__}, expected a string")
    text = " ".join(text.split()) if text else None
    try:
        audio = None if audio is None else _audio(audio, base)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if text is None and audio is None:
        raise ValueError(f"{where}: holds neither text nor audio")
    return Turn(m["role"], text, audio)


def parse_conversation(row, base: str) -> list[Turn]:
    """One conversation ({"messages": [...]}) -> its turns; base: the folder audio paths are relative to. Raises
    ValueError naming the message and field that is wrong."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected {\"messages\": [a list of turns]}")
    turns = []
    for i, m in enumerate(messages):
        turn = parse_message(m, f"message {i}", base)
        if turn.role == "assistant" and (turn.text is None or turn.audio is None):
            raise ValueError(f"message {i}: an assistant turn needs its text and its audio (it says what it writes)")
        turns.append(turn)
    if not any(t.role == "assistant" for t in turns):
        raise ValueError("no assistant turn: nothing to learn from")
    return turns


def read_jsonl(path: str) -> Iterator[tuple[int, list[Turn] | None, str]]:
    """(line number from 0, turns or None, why not) for every non-blank line of a .jsonl file."""
    base = os.path.dirname(path)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield n, parse_conversation(json.loads(line), base), ""
            except json.JSONDecodeError as e:
                yield n, None, f"not JSON ({e.msg} at column {e.colno})"
            except ValueError as e:
                yield n, None, str(e)
