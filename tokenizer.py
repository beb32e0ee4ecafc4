"""The token layout: where every text id and SNAC code goes in one flat stream of ids, and back (the format spec).

    from tokenizer import Layout
    layout = Layout(vq_strides=(4, 2, 1), codebook_size=4096, text_encoding="gpt2", text_vocab=50257)
    ids = layout.codes_to_tokens(codes)                    # SNAC codes per level -> audio ids, whole frames
    doc = layout.document(audio=ids, text=text_ids, text_first=True)   # one training item

Pure id arithmetic, numpy or torch alike: no codec, no audio files (codec.py holds those). Text ids come from a
tiktoken encoding (load_text_encoding).

THE LAYOUT (written once, here; recorded in meta.json and in every checkpoint by its name)
SNAC quantises audio into n_levels code sequences, coarse to fine. Level l has one code every
vq_strides[l] latent steps, so per coarse code there are vq_strides[0] // vq_strides[l] codes of level l.
A *frame* is one coarse code and all of its descendants, in depth-first order. For snac_24khz
(vq_strides [4, 2, 1]) a frame is 7 tokens covering 2048 samples (85.3 ms):

    L0[i], L1[2i], L2[4i], L2[4i+1], L1[2i+1], L2[4i+2], L2[4i+3]

There is no separator inside or between frames. The ids, in three ranges (TEXT_LAYOUT_NAME, "snac-text-audio-v1"):

    [0, text_vocab)                     text: the tiktoken encoding's own ids, unchanged (GPT-2 BPE: 50,257),
                                        so a GPT-2 tokenizer reads them directly
    text_vocab + level * codebook_size + code      audio: each level its own range, so a token's level is never
                                        guessed (SNAC 24 kHz: 3 x 4096 ids)
    then the special tokens, in SPECIAL_TOKENS order: BOUNDARY, TEXT_START, TEXT_END, AUDIO_START, AUDIO_END
                                        (GPT-2 BPE + SNAC 24 kHz: 62,545 .. 62,549; vocab 62,550)

A document is [BOUNDARY] then its segments, each wrapped: [TEXT_START] text [TEXT_END] and
[AUDIO_START] frames [AUDIO_END]. Speech-from-text items are [text][audio], transcription items [audio][text],
audio without text [audio], text without audio [text]. Text is encoded with the encoding's encode_ordinary, so
its own special tokens (<|endoftext|>) never appear.

VOICES. A speaker rides in the text, Orpheus' way: a speech-from-text item of speaker NAME has the text
"NAME: words" (voice_text). A text prefix, not a token per speaker: the layout (and so every checkpoint's vocab)
stays the same whatever the speakers, a new voice needs no new embedding row, and the name is text the model already
reads. The audio-only layout has no text, so it has no voices. A cloning item holds two utterances of one speaker,
[BOUNDARY][ref text][ref audio][text][audio] with no name (clone_document): the voice must come from the reference
audio, so the model learns to keep the voice it hears; clone_context(...) is the same open after AUDIO_START.

CONVERSATIONS (CHAT_LAYOUT_NAME, "snac-chat-v1") extend the text+audio layout by three role tokens after its special
tokens, SYSTEM, USER, ASSISTANT (GPT-2 BPE + SNAC 24 kHz: 62,550 .. 62,552): every id of that layout keeps its
meaning, so a text+audio checkpoint fine-tunes on chats with three new embedding rows. A conversation is [BOUNDARY]
then its turns, each [ROLE] [text segment] [audio segment] (conversation(); an assistant turn has both, text first);
its loss mask counts the assistant turns only.

The audio-only layout (LAYOUT_NAME, "snac-depth-first-v1", text_vocab = 0) is the same with no text range and one
special token: [BOUNDARY] + frames per document, audio ids from 0 and BOUNDARY = n_levels * codebook_size.
Datasets and checkpoints written with it keep working (train, resume, generate).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

DEFAULT_TEXT_ENCODING = "gpt2"  # GPT-2's BPE, through tiktoken
LAYOUT_NAME = "snac-depth-first-v1"  # audio only
TEXT_LAYOUT_NAME = "snac-text-audio-v1"  # text ids, then audio ids, then SPECIAL_TOKENS
SPECIAL_TOKENS = ("boundary", "text_start", "text_end", "audio_start", "audio_end")
CHAT_LAYOUT_NAME = "snac-chat-v1"  # the text+audio layout's ids, then CHAT_TOKENS: conversations
CHAT_TOKENS = ("system", "user", "assistant")  # one role token opens each turn


@dataclass(frozen=True)
class Layout:
    """Where every text id and SNAC code goes in the flat stream. Built from the codec's vq_strides and
    codebook_size, and the text encoding's name and n_vocab (none for the audio-only layout)."""
    vq_strides: tuple[int, ...]  # SNAC's, coarse level first, e.g. (4, 2, 1)
    codebook_size: int  # codes per level, e.g. 4096
    text_encoding: str = ""  # tiktoken encoding name, e.g. "gpt2"; "" = the audio-only layout
    text_vocab: int = 0  # its n_vocab: text ids are 0 .. text_vocab - 1
    chat: bool = False  # the role tokens of conversations after the other special tokens (CHAT_LAYOUT_NAME)

    def __post_init__(self):
        if bool(self.text_encoding) != (self.text_vocab > 0):
            raise ValueError(f"text_encoding '{self.text_encoding}' and text_vocab {self.text_vocab}: give both or "
                             "neither")
        if self.chat and not self.text_vocab:
            raise ValueError("conversations need a text encoding: the chat layout extends the text+audio layout")

    @property
    def name(self) -> str:
        return CHAT_LAYOUT_NAME if self.chat else TEXT_LAYOUT_NAME if self.text_vocab else LAYOUT_NAME

    @property
    def n_levels(self) -> int:
        return len(self.vq_strides)

    @property
    def codes_per_frame(self) -> tuple[int, ...]:
        """Codes of each level in one frame, e.g. (1, 2, 4)."""
        return tuple(self.vq_strides[0] // s for s in self.vq_strides)

    @property
    def frame_size(self) -> int:
        return sum(self.codes_per_frame)

    @property
    def audio_offset(self) -> int:
        """The first audio id (level 0, code 0): audio ids come after the text ids."""
        return self.text_vocab

    @property
    def n_audio(self) -> int:
        return self.n_levels * self.codebook_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Name -> id of every special token, after all text and audio ids."""
        names = SPECIAL_TOKENS + CHAT_TOKENS * self.chat if self.text_vocab else SPECIAL_TOKENS[:1]
        first = self.audio_offset + self.n_audio
        return {name: first + i for i, name in enumerate(names)}

    def special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"the {self.name} layout has no {name.upper()} token (it has "
                             f"{', '.join(self.special_tokens)})")
        return self.special_tokens[name]

    @property
    def boundary_id(self) -> int:
        return self.audio_offset + self.n_audio

    @property
    def vocab_size(self) -> int:
        return self.boundary_id + len(self.special_tokens)

    @cached_property
    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        """frame_levels[p], frame_slots[p]: level and index within the frame's codes of that level, position p."""
        levels, slots = [], []

        def visit(level: int, index: int) -> None:
            levels.append(level)
            slots.append(index)
            if level + 1 < self.n_levels:
                branch = self.vq_strides[level] // self.vq_strides[level + 1]
                for j in range(branch):
                    visit(level + 1, index * branch + j)

        visit(0, 0)
        return np.array(levels), np.array(slots)

    @property
    def frame_levels(self) -> np.ndarray:
        """Level required at each position of a frame, e.g. [0, 1, 2, 2, 1, 2, 2]."""
        return self._order[0]

    @property
    def frame_lo(self) -> np.ndarray:
        """The first id of the level each frame position needs: frame_levels * codebook_size + audio_offset."""
        return self.frame_levels * self.codebook_size + self.audio_offset

    @cached_property
    def _perm(self) -> np.ndarray:
        """Frame position -> index in the level-major concatenation [L0 codes | L1 codes | L2 codes] of one frame."""
        offsets = np.cumsum((0,) + self.codes_per_frame[:-1])
        levels, slots = self._order
        return offsets[levels] + slots

    @cached_property
    def _inv_perm(self) -> np.ndarray:
        return np.argsort(self._perm)

    def codes_to_tokens(self, codes: list) -> np.ndarray | torch.Tensor:
        """SNAC codes [(..., n_frames * codes_per_frame[l]) per level] -> tokens (..., n_frames * frame_size).

        Numpy arrays in, numpy out; tensors in, tensors out (same device). Any leading batch shape.
        """
        if len(codes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} code levels, got {len(codes)}")
        if torch.is_tensor(codes[0]) and codes[0].device.type == "cpu":
            # CPU tensors go through numpy on the same memory: torch kernel launches dominate gathers this small
            return torch.from_numpy(self.codes_to_tokens([c.numpy() for c in codes]))
        n_frames = codes[0].shape[-1]
        batch = tuple(codes[0].shape[:-1])
        parts = []
        for level, (c, k) in enumerate(zip(codes, self.codes_per_frame)):
            if tuple(c.shape) != batch + (n_frames * k,):
                raise ValueError(f"level {level} codes have shape {tuple(c.shape)}, expected {batch + (n_frames * k,)}")
            c = c.long() if torch.is_tensor(c) else c.astype(np.int64)  # before the offset: uint16 codes overflow
            offset = level * self.codebook_size + self.audio_offset
            parts.append(c.reshape(*batch, n_frames, k) + offset)  # (..., F, k_l)
        if torch.is_tensor(parts[0]):
            frames = torch.cat(parts, dim=-1)[..., torch.from_numpy(self._perm).to(parts[0].device)]
        else:
            frames = np.concatenate(parts, axis=-1)[..., self._perm]
        return frames.reshape(*batch, n_frames * self.frame_size)  # (..., F, frame_size) -> (..., F * frame_size)

    def tokens_to_codes(self, tokens) -> list:
        """Exact inverse of codes_to_tokens. Raises ValueError on a partial frame or an id of the wrong level;
        use repair() first for generated streams."""
        if torch.is_tensor(tokens) and tokens.device.type == "cpu":
            return [torch.from_numpy(c) for c in self.tokens_to_codes(tokens.numpy())]
        n = tokens.shape[-1]
        if n % self.frame_size:
            raise ValueError(f"{n} tokens is not a whole number of {self.frame_size}-token frames")
        batch = tuple(tokens.shape[:-1])
        frames = tokens.reshape(*batch, n // self.frame_size, self.frame_size)  # (..., F, frame_size)
        lo = self.frame_lo
        if torch.is_tensor(frames):
            lo = torch.from_numpy(lo).to(frames.device)
        bad = (frames < lo) | (frames >= lo + self.codebook_size)
        if bad.any():
            flat = int(np.flatnonzero(np.asarray(bad.cpu() if torch.is_tensor(bad) else bad).reshape(-1))[0])
            row, pos = divmod(flat, n)  # batch row and position in it
            raise ValueError(f"token {pos} of row {row} (id {int(tokens.reshape(-1)[flat])}) is not a "
                             f"level-{self.frame_levels[pos % self.frame_size]} code")
        inv = torch.from_numpy(self._inv_perm).to(tokens.device) if torch.is_tensor(tokens) else self._inv_perm
        frames = frames[..., inv] - self.audio_offset  # level-major inside each frame
        codes, start = [], 0
        for level, k in enumerate(self.codes_per_frame):
            c = frames[..., start:start + k] - level * self.codebook_size  # (..., F, k_l)
            codes.append(c.reshape(*batch, -1))  # (..., F * k_l)
            start += k
        return codes

    def repair(self, tokens: np.ndarray) -> np.ndarray:
        """Make any 1-D generated stream decodable, keeping its length in whole frames:
        text and special tokens are dropped (they carry no audio), a trailing partial frame is dropped, and an id
        of the wrong level keeps its code but moves to the level its position requires (id % codebook_size)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1) - self.audio_offset
        tokens = tokens[(tokens >= 0) & (tokens < self.n_audio)]
        tokens = tokens[: len(tokens) // self.frame_size * self.frame_size]
        frames = tokens.reshape(-1, self.frame_size) % self.codebook_size + self.frame_lo
        return frames.reshape(-1)

    def groups(self, ids: torch.Tensor) -> torch.Tensor:
        """The eval group of each id (same shape): 0 .. n_levels - 1 = that audio level, then text, then special
        (names in group_names)."""
        group = torch.div(ids - self.audio_offset, self.codebook_size, rounding_mode="floor")
        group = torch.where(ids >= self.boundary_id, self.n_levels + 1, group)
        return torch.where(ids < self.audio_offset, self.n_levels, group)

    @property
    def group_names(self) -> list[str]:
        return [f"L{i}" for i in range(self.n_levels)] + ["text", "special"]

    # --- documents and generation contexts -----------------------------------------------------------------

    def _check_audio(self, audio: np.ndarray) -> None:
        frames = audio.reshape(-1, self.frame_size) if len(audio) % self.frame_size == 0 else None
        if frames is None or ((frames < self.frame_lo) | (frames >= self.frame_lo + self.codebook_size)).any():
            raise ValueError(f"audio of {len(audio)} ids: expected whole {self.frame_size}-token frames of audio "
                             f"ids, each at the level its frame position needs ({self.audio_offset} .. "
                             f"{self.boundary_id - 1})")

    def document(self, audio=None, text=None, text_first: bool = True) -> np.ndarray:
        """One document of the training stream, int64: [BOUNDARY] then its segments (see the top of this file).
        audio: audio ids (whole frames) or None; text: text ids or None; with both, text_first=True gives a
        speech-from-text item [text][audio], False a transcription item [audio][text]."""
        b = self.special_tokens
        parts = []
        if audio is not None:
            audio = np.asarray(audio, dtype=np.int64).reshape(-1)
            self._check_audio(audio)
            parts.append([b["audio_start"], *audio, b["audio_end"]] if self.text_vocab else audio)
        if text is not None:
            if not self.text_vocab:
                raise ValueError(f"the {LAYOUT_NAME} layout holds no text; prepare the data with a text encoding")
            text = np.asarray(text, dtype=np.int64).reshape(-1)
            if ((text < 0) | (text >= self.text_vocab)).any():
                raise ValueError(f"text ids must be in 0 .. {self.text_vocab - 1} (the {self.text_encoding} encoding)")
            parts.insert(0 if text_first else len(parts), [b["text_start"], *text, b["text_end"]])
        return np.concatenate([[self.boundary_id], *parts]).astype(np.int64)

    def audio_context(self, audio=None) -> np.ndarray:
        """What unconditional sampling (audio=None) or audio continuation starts from: an audio document, open."""
        doc = self.document(audio=np.zeros(0, np.int64) if audio is None else audio)
        return doc[:-1] if self.text_vocab else doc  # without AUDIO_END

    def speech_context(self, text) -> np.ndarray:
        """Text-to-speech: [BOUNDARY, TEXT_START, text, TEXT_END, AUDIO_START]; the model continues with audio."""
        return self.document(audio=np.zeros(0, np.int64), text=text, text_first=True)[:-1]

    def transcript_context(self, audio) -> np.ndarray:
        """Transcription: [BOUNDARY, AUDIO_START, audio, AUDIO_END, TEXT_START]; the model continues with text."""
        return self.document(audio=audio, text=np.zeros(0, np.int64), text_first=False)[:-1]

    def clone_document(self, ref_audio, ref_text, audio, text) -> np.ndarray:
        """A cloning item: [BOUNDARY][ref text][ref audio][text][audio], two utterances of one speaker."""
        first = self.document(audio=ref_audio, text=ref_text, text_first=True)
        return np.concatenate([first, self.document(audio=audio, text=text, text_first=True)[1:]])

    def clone_context(self, ref_audio, ref_text, text) -> np.ndarray:
        """Voice cloning: a cloning item open after its second AUDIO_START; the model continues with audio in the
        reference's voice."""
        return self.clone_document(ref_audio, ref_text, np.zeros(0, np.int64), text)[:-1]

    # --- conversations (the chat layout) --------------------------------------------------------------------

    def turn(self, role: str, text=None, audio=None) -> np.ndarray:
        """One turn: [ROLE], then its text segment, then its audio segment. An assistant turn holds both: it thinks
        in text, then speaks it (mini-omni's and LLaMA-Omni's order); a user turn may be audio only."""
        if role not in CHAT_TOKENS:
            raise ValueError(f"role '{role}': expected one of {', '.join(CHAT_TOKENS)}")
        if text is None and audio is None:
            raise ValueError(f"a {role} turn holds neither text nor audio")
        doc = self.document(audio=audio, text=text, text_first=True)
        return np.concatenate([[self.special(role)], doc[1:]]).astype(np.int64)

    def conversation(self, turns: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """(role, text ids or None, audio ids or None) turns -> [BOUNDARY] + the turns, and the loss mask (uint8,
        one per id): 1 where the id is a target the loss counts, which is every id of an assistant turn after its
        role token (the model learns to answer, not to ask)."""
        ids, mask = [np.array([self.boundary_id], np.int64)], [np.zeros(1, np.uint8)]
        for role, text, audio in turns:
            t = self.turn(role, text, audio)
            ids.append(t)
            m = np.full(len(t), role == "assistant", np.uint8)
            m[0] = 0
            mask.append(m)
        return np.concatenate(ids), np.concatenate(mask)

    def chat_context(self, turns: list[tuple]) -> np.ndarray:
        """What a reply is sampled from: the conversation, then [ASSISTANT, TEXT_START]: the reply's text comes
        first, then (after TEXT_END, AUDIO_START) its speech."""
        return np.concatenate([self.conversation(turns)[0], [self.special("assistant"), self.special("text_start")]])

    def fit_turns(self, turns: list[tuple], room: int, block_size: int) -> list[tuple]:
        """The turns whose chat_context leaves `room` ids for a reply in a block_size context: the oldest whole
        turns leave first; a system turn that opens the conversation stays."""
        while len(turns) > 1 and len(self.chat_context(turns)) + room > block_size:
            drop = 1 if turns[0][0] == "system" and len(turns) > 2 else 0
            turns = turns[:drop] + turns[drop + 1:]
        return turns

    def split_reply(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """The ids sampled after chat_context -> (text ids up to TEXT_END, audio ids between AUDIO_START and
        AUDIO_END, or up to the end; whole frames only)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        sp = self.special_tokens
        end = np.flatnonzero(ids == sp["text_end"])
        text = ids[:end[0]] if len(end) else ids
        text = text[text < self.text_vocab]
        rest = ids[end[0] + 1:] if len(end) else ids[:0]
        start = np.flatnonzero(rest == sp["audio_start"])
        audio = rest[start[0] + 1:] if len(start) else rest[:0]
        stop = np.flatnonzero(audio == sp["audio_end"])
        audio = audio[:stop[0]] if len(stop) else audio
        return text, audio[:len(audio) // self.frame_size * self.frame_size]

    def meta(self) -> dict:
        text = {"text_encoding": self.text_encoding, "text_vocab": self.text_vocab, "audio_offset": self.audio_offset}
        return {
            "layout": self.name,
            **(text if self.text_vocab else {}),
            "vq_strides": list(self.vq_strides),
            "n_levels": self.n_levels,
            "codebook_size": self.codebook_size,
            "frame_size": self.frame_size,
            "frame_levels": self.frame_levels.tolist(),
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_meta(cls, meta: dict) -> "Layout":
        """The layout recorded in a meta.json or checkpoint; an unknown or inconsistent layout is a ValueError."""
        name = meta.get("layout")
        if name not in (LAYOUT_NAME, TEXT_LAYOUT_NAME, CHAT_LAYOUT_NAME):
            raise ValueError(f"token layout '{name}' is not supported (expected '{TEXT_LAYOUT_NAME}', "
                             f"'{CHAT_LAYOUT_NAME}' or '{LAYOUT_NAME}'); re-run prepare_audio.py")
        try:
            text = (str(meta["text_encoding"]), int(meta["text_vocab"])) if name != LAYOUT_NAME else ("", 0)
            layout = cls(tuple(int(s) for s in meta["vq_strides"]), int(meta["codebook_size"]), *text,
                         chat=name == CHAT_LAYOUT_NAME)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"token layout '{name}': its record is incomplete or damaged ({type(e).__name__}: "
                             f"{e}); re-run prepare_audio.py") from None
        recorded = meta.get("special_tokens", layout.special_tokens)
        if recorded != layout.special_tokens:
            raise ValueError(f"token layout '{name}': special_tokens {recorded} do not match the layout "
                             f"({layout.special_tokens}); re-run prepare_audio.py")
        return layout


# -----------------------------------------------------------------------------
# voices: the one rule for where a speaker's name goes (prepare_audio.py writes it, generate.py and servers ask it)

def voice_text(text: str, voice: str = "", voices: list[str] | None = None) -> str:
    """The text of a speech-from-text item in `voice`: "NAME: text" (no voice: the text as it is). voices: the
    model's (meta.json's "voices"); given, an unknown voice is a ValueError listing the known ones."""
    if not voice:
        return text
    if voices is not None and voice not in voices:
        known = ", ".join(voices) if voices else "none: the model was trained without speakers"
        raise ValueError(f"voice '{voice}': unknown (known voices: {known})")
    return f"{voice}: {text}"


# -----------------------------------------------------------------------------
# text: tiktoken encodings, found by name through tiktoken's tiktoken_ext plugin namespace

def load_text_encoding(name: str):
    """A tiktoken Encoding by name ("gpt2", "r50k_base", or one a tiktoken_ext plugin registers).
    Raises ValueError with what to do when it is unknown or its BPE file cannot be fetched (offline)."""
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        if not str(e).startswith("Unknown encoding"):
            raise ValueError(f"text encoding '{name}': {str(e).splitlines()[0]}") from None
        raise ValueError(f"text encoding '{name}': tiktoken knows no such encoding (it knows "
                         f"{', '.join(tiktoken.list_encoding_names())}); others are registered through a "
                         "tiktoken_ext plugin module") from None
    except Exception as e:  # requests' ConnectionError, HTTP errors, a damaged cache file
        raise ValueError(
            f"text encoding '{name}': its BPE file cannot be downloaded ({type(e).__name__}). Offline, run "
            f"`TIKTOKEN_CACHE_DIR=tiktoken_cache python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"` "
            "on a machine with internet, copy that folder here and set TIKTOKEN_CACHE_DIR=<its path>; or register "
            "the encoding through a tiktoken_ext plugin module") from None


def text_token_bytes(enc) -> np.ndarray:
    """Bytes of each text id, (n_vocab,) int64: the denominator of bits per byte. 0 for the encoding's own special
    tokens and unused ids, which documents never hold (text goes through encode_ordinary) and sampling never
    picks."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    out = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i not in special:
            try:
                out[i] = len(enc.decode_single_token_bytes(i))
            except KeyError:  # an id the encoding leaves unused
                pass
    return out
