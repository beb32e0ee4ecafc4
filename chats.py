"""Conversations for chat fine-tuning: a folder of chat files, read into turns whose audio is a file (relative to
the chat file), bytes or SNAC codes. prepare_audio.py encodes the audio and
writes each conversation with Layout.conversation (role tokens, a loss mask on the assistant turns).

    from chats import read_chats
    for row, turns, error in read_chats("chats/part-0.jsonl"):   # turns: [Turn(role, text, audio)], or an error
        ...

Shapes (chat_shape tells them apart by file type and keys or columns):
- messages: .jsonl lines, or .parquet rows with a "messages" column (a list of structs, or a JSON string).
- voiceassistant: gpt-omni/VoiceAssistant-400K's parquet (question_audio, answer, answer_snac); adjacent rows with
  the same split_name and index and increasing round are one conversation; the user speaks, the assistant answers.
- instructs2s: ICTNLP/InstructS2S-200K's .json list (or .jsonl lines) of {"id", "conversation": [{"from": human,
  gpt or system, "value" or "text", "speech": a wav path}]}; an assistant turn needs its "speech".

A line: {"messages": [{"role": "user", "audio": "clips/q1.wav"}, {"role": "assistant", "text": "Paris.",
"audio": {"codes": [...]}}]}. Roles are system, user, assistant; a turn holds text, audio or both (an assistant
turn both: it says what it writes); audio is a path, {"path": ...}, {"bytes": <base64>} or {"codes": [...]} (SNAC
codes, flattened depth-first, as a codes column holds them). OpenAI-style content lists are read too: "content" as
a string, or a list of {"type": "text", "text"} and {"type": "input_audio", "input_audio": {"data": <base64>}} parts.
"""
from __future__ import annotations

import base64
import binascii
import itertools
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


def _audio(value, base: str) -> tuple | None:
    if isinstance(value, dict) and all(v is None for v in value.values()):
        return None  # a parquet struct with no audio in this turn
    if isinstance(value, list) and all(isinstance(c, int) for c in value):
        return "codes", value
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return "bytes", value["bytes"]  # raw bytes, as HF datasets' Audio writes them to parquet
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
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise ValueError(f"messages: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected {\"messages\": [a list of turns]}")
    turns = []
    for i, m in enumerate(messages):
        turns.append(parse_message(m, f"message {i}", base))
    return checked(turns)


def checked(turns: list[Turn]) -> list[Turn]:
    """The turns, if every assistant turn says what it writes and there is one to learn from; else ValueError."""
    for i, t in enumerate(turns):
        if t.role == "assistant" and (t.text is None or t.audio is None):
            raise ValueError(f"message {i}: an assistant turn needs its text and its audio (it says what it writes)")
    if not any(t.role == "assistant" for t in turns):
        raise ValueError("no assistant turn: nothing to learn from")
    return turns


ROLES_S2S = {"human": "user", "gpt": "assistant", "system": "system"}


def parse_instructs2s(row, base: str) -> list[Turn]:
    """One InstructS2S record ({"id", "conversation": [...]}) -> its turns; HuBERT "unit"s are not used."""
    conversation = row.get("conversation") if isinstance(row, dict) else None
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("expected {\"conversation\": [a list of turns]}")
    turns = []
    for i, m in enumerate(conversation):
        role = ROLES_S2S.get(m.get("from")) if isinstance(m, dict) else None
        if role is None:
            raise ValueError(f"message {i}: from {m.get('from') if isinstance(m, dict) else m!r} is not one of "
                             f"{', '.join(ROLES_S2S)}")
        text, speech = m.get("value", m.get("text")), m.get("speech")
        if text is not None and not isinstance(text, str) or speech is not None and not isinstance(speech, str):
            raise ValueError(f"message {i}: value/text and speech must be strings")
        text = " ".join(text.split()) if text else None
        audio = ("file", os.path.join(base, speech)) if speech else None
        if role == "user" and audio is not None:
            text = None  # the user speaks; its text is what the speech says
        if text is None and audio is None:
            raise ValueError(f"message {i}: holds neither text nor speech")
        turns.append(Turn(role, text, audio))
    return checked(turns)


def mini_omni_codes(value: str) -> tuple[list[int], list[int], list[int]]:
    """answer_snac ("#"-separated frames of 7 codes in mini-omni's order l0, l1[2i], l2[4i], l2[4i+1], l1[2i+1],
    l2[4i+2], l2[4i+3]) -> SNAC 24 kHz codes per level, coarse first. Raises ValueError naming the bad frame."""
    levels: tuple[list[int], list[int], list[int]] = ([], [], [])
    frames = [f.strip() for f in value.split("#") if f.strip()] if isinstance(value, str) else None
    if not frames:
        raise ValueError("answer_snac: no frames")
    for k, frame in enumerate(frames):
        try:
            c = [int(x) for x in frame.split()]
        except ValueError:
            c = []
        if len(c) != 7:
            raise ValueError(f"answer_snac frame {k}: {frame[:40]!r} is not 7 integers")
        levels[0].append(c[0])
        levels[1].extend((c[1], c[4]))
        levels[2].extend((c[2], c[3], c[5], c[6]))
    return levels


def voiceassistant_turns(rows: list[dict]) -> list[Turn]:
    """Rows of one VoiceAssistant conversation (rounds in order) -> user audio, assistant text + SNAC codes."""
    turns = []
    for row in rows:
        question = row.get("question_audio")
        if not isinstance(question, dict) or not isinstance(question.get("bytes"), bytes):
            raise ValueError("question_audio: no audio bytes")
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("answer: no text")
        turns += [Turn("user", None, ("bytes", question["bytes"])),
                  Turn("assistant", " ".join(answer.split()), ("codes", mini_omni_codes(row.get("answer_snac"))))]
    return turns


VOICEASSISTANT = {"split_name", "index", "round", "question_audio", "answer", "answer_snac"}
SHAPES = "messages (.jsonl, .parquet), voiceassistant (.parquet: " + ", ".join(sorted(VOICEASSISTANT)) + \
    "), instructs2s (.json, .jsonl: id, conversation)"


def chat_shape(path: str) -> str:
    """Which shape a chat file has, by its type and its keys or columns; ValueError naming what was found."""
    ext = path.rsplit(".", 1)[-1].lower()
    if ext == "parquet":
        import pyarrow.parquet as pq
        found = pq.read_schema(path).names
        if "messages" in found:
            return "messages"
        if VOICEASSISTANT <= set(found):
            return "voiceassistant"
    else:
        return record_shape(path, next(iter(_records(path)), (0, {}))[1])
    raise ValueError(f"{path}: a chat file with keys/columns {', '.join(found) or 'none'}; expected one of {SHAPES}")


def record_shape(path: str, first: object) -> str:
    """chat_shape of a .json or .jsonl file from its first record."""
    found = list(first) if isinstance(first, dict) else [type(first).__name__]
    if ("messages" in found or isinstance(first, _NotJSON)) and path.lower().endswith(".jsonl"):  # a bad row
        return "messages"
    if "conversation" in found:
        return "instructs2s"
    raise ValueError(f"{path}: a chat file with keys/columns {', '.join(found) or 'none'}; expected one of {SHAPES}")


def _records(path: str) -> Iterator[tuple[int, object]]:
    """(row, record) of a .json list or of .jsonl lines (a line that is not JSON: its error message as a string)."""
    with open(path, encoding="utf-8-sig") as f:
        if path.lower().endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
            yield from enumerate(data)
            return
        for n, line in enumerate(f):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, _NotJSON(f"not JSON ({e.msg} at column {e.colno})")


class _NotJSON(str):
    pass


def read_chats(path: str) -> Iterator[tuple[int, list[Turn] | None, str]]:
    """(row from 0, turns or None, why not) for every conversation of a chat file of any shape (chat_shape)."""
    base = os.path.dirname(path)
    if path.lower().endswith(".parquet"):
        shape = chat_shape(path)
        if shape == "voiceassistant":
            yield from _voiceassistant(path)
            return
        records = enumerate(_parquet_rows(path, None))
    else:  # a .json file is parsed once: its shape is its first record's
        records = _records(path)
        first = next(records, None)
        if first is None:
            return
        shape = record_shape(path, first[1])
        records = itertools.chain([first], records)
    parse = parse_instructs2s if shape == "instructs2s" else parse_conversation
    for n, row in records:
        if isinstance(row, _NotJSON):
            yield n, None, str(row)
            continue
        try:
            yield n, parse(row, base), ""
        except ValueError as e:
            yield n, None, str(e)


def _parquet_rows(path: str, columns: list[str] | None) -> Iterator[dict]:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=columns):
        yield from batch.to_pylist()


def _voiceassistant(path: str) -> Iterator[tuple[int, list[Turn] | None, str]]:
    run: list[tuple[int, dict]] = []

    def flush():
        try:
            return run[0][0], voiceassistant_turns([r for _, r in run]), ""
        except ValueError as e:
            return run[0][0], None, str(e)

    for n, row in enumerate(_parquet_rows(path, sorted(VOICEASSISTANT))):
        if run and not (row["split_name"] == run[-1][1]["split_name"] and row["index"] == run[-1][1]["index"] and
                        (row["round"] or 0) > (run[-1][1]["round"] or 0)):
            yield flush()
            run = []
        run.append((n, row))
    if run:
        yield flush()
