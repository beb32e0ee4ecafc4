"""Frame-valid sampling with a KV cache, and decoding tokens to audio while they are generated. No I/O.

    from sampling import generate_tokens, StreamDecoder
    tokens = generate_tokens(model, tok.layout, prompt=None, n_frames=120, num_samples=4)   # (4, 120 * frame_size)
    dec = StreamDecoder(tok, chunk_frames=12)          # push frames as they come, get final audio back

Used by generate.py (and by train.py for eval samples). Errors are ValueError with a message for the user.
"""
from __future__ import annotations

from typing import Iterator

import torch

from tokenizer import AudioTokenizer, Layout

# The SNAC decoder is convolutional: a frame's audio depends on its neighbours. Measured with the 24 kHz model,
# decoding a chunk with 3 frames of real codes on each side matches one pass over the whole stream to 6e-7,
# 5 frames to 0. Streaming decodes this many frames on each side of a chunk and keeps only the middle.
CODEC_CONTEXT_FRAMES = 4
# frames of audio one codec call decodes at most (all rows together): 240 frames = 20 s at 24 kHz, ~1.5 GB of
# activations for SNAC 24 kHz
DECODE_FRAMES = 240
# when the context is full, the window keeps about this fraction of block_size (whole frames): the larger, the
# more history the model sees, the smaller, the fewer re-prefills (one forward of the window each)
KEEP_FRACTION = 0.75


# -----------------------------------------------------------------------------
# sampling

def frame_masks(layout: Layout, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """(frame_size, vocab_size) additive logit masks: 0 on the ids of the level each frame position needs, -inf
    elsewhere (other levels, text and every special token)."""
    return torch.zeros(layout.frame_size, vocab_size).masked_fill(~frame_allowed(layout, vocab_size),
                                                                  float("-inf")).to(device)


def frame_allowed(layout: Layout, vocab_size: int) -> torch.Tensor:
    """(frame_size, vocab_size) bool: the ids of the level each frame position needs."""
    ids = torch.arange(vocab_size)
    lo = torch.as_tensor(layout.frame_lo)[:, None]  # (frame_size, 1)
    return (ids >= lo) & (ids < lo + layout.codebook_size)


class Grammar:
    """Which ids may come next, for every row of a batch: a small state machine over the special tokens.

    In audio, only the ids of the level the frame position needs, and AUDIO_END only at a frame boundary; in
    text, only the encoding's ordinary ids and TEXT_END. Sampling continues one open segment: its end token
    finishes the row, which from then on may only repeat that token (callers cut each row at its first end token).
    States, one per row: 0 .. frame_size - 1 = audio at that frame position, then TEXT, AUDIO_DONE, TEXT_DONE.
    The audio-only layout has no end token, so there a row is audio forever, as before.
    """

    def __init__(self, layout: Layout, vocab_size: int, device: torch.device | str,
                 text_ok: torch.Tensor | None = None):
        """text_ok: (text_vocab,) bool, the text ids sampling may write (tokenizer's text_bytes > 0); None = all."""
        fs, sp = layout.frame_size, layout.special_tokens
        self.layout, self.fs = layout, fs
        self.TEXT, self.AUDIO_DONE, self.TEXT_DONE = fs, fs + 1, fs + 2
        self.audio_end, self.text_end = sp.get("audio_end", -1), sp.get("text_end", -1)  # -1: no such token
        allowed = torch.zeros(fs + 3, vocab_size, dtype=torch.bool)  # (state, id)
        allowed[:fs] = frame_allowed(layout, vocab_size)
        if self.audio_end >= 0:
            allowed[[0, self.AUDIO_DONE], self.audio_end] = True  # audio may end only where a new frame would start
        if layout.text_vocab:
            allowed[self.TEXT, :layout.text_vocab] = True if text_ok is None else text_ok
            allowed[[self.TEXT, self.TEXT_DONE], self.text_end] = True
        self.masks = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(device)  # (states, V)

    def start(self, context: torch.Tensor, batch: int) -> torch.Tensor:
        """The state (batch,) after `context` (1-D, the same for every row), which must end inside an open audio
        segment (after AUDIO_START, or BOUNDARY in the audio-only layout) or text segment (after TEXT_START)."""
        sp, ctx = self.layout.special_tokens, context.reshape(-1).cpu()
        where = torch.nonzero(ctx >= self.layout.boundary_id).reshape(-1)
        last = int(ctx[where[-1]]) if len(where) else None
        after = len(ctx) - 1 - int(where[-1]) if len(where) else 0  # tokens since the last special token
        if last == sp.get("audio_start", sp["boundary"]):
            state = after % self.fs
        elif last is not None and last == sp.get("text_start"):
            state = self.TEXT
        else:
            raise ValueError("a sampling context must end inside an audio or text segment (after "
                             f"{'AUDIO_START or TEXT_START' if self.layout.text_vocab else 'BOUNDARY'})")
        return torch.full((batch,), state, dtype=torch.long, device=self.masks.device)

    def mask(self, logits: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> the same with every id the state forbids at -inf."""
        return logits + self.masks[state]

    def advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The state after each row's new token (B,), which the mask allowed."""
        new = torch.where(token < self.layout.audio_offset, self.TEXT, (state + 1) % self.fs)
        new = torch.where(token == self.audio_end, self.AUDIO_DONE, new)
        return torch.where(token == self.text_end, self.TEXT_DONE, new)

    def ended(self, state: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows whose segment is over."""
        return state > self.TEXT

    @property
    def can_end(self) -> bool:
        """Whether a segment can end at all (not in the audio-only layout)."""
        return self.audio_end >= 0 or self.text_end >= 0


def keep_frames(layout: Layout, block_size: int) -> int:
    """Whole frames kept when the window slides; leaves room for the partial frame in progress plus one token."""
    fs = layout.frame_size
    if block_size < 2 * fs:
        raise ValueError(f"block_size {block_size} is too small to generate: it must hold at least 2 frames "
                         f"({2 * fs} tokens)")
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
                  generator: torch.Generator | None = None, use_cache: bool = True,
                  context: torch.Tensor | None = None, grammar: Grammar | None = None) -> Iterator[torch.Tensor]:
    """Yield up to n_frames new frames, each (num_samples, frame_size), continuing context + prompt (whole frames).

    context: the tokens before the prompt, default layout.audio_context() ([BOUNDARY], then AUDIO_START in the
    text+audio layout); layout.speech_context(text) makes it speak a text. grammar: which ids may come next
    (default Grammar(layout, ...): audio, ending with AUDIO_END where the layout has one); a text grammar after
    layout.transcript_context(audio) writes text, frame_size tokens per yield. Once every row's segment has ended
    sampling stops early; a row that ended first repeats its end token. use_cache=False recomputes the whole
    window for every token (nanoGPT's generate); same tokens, much slower.
    """
    fs, block_size = layout.frame_size, model.config.block_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
    prompt = prompt.reshape(-1)
    assert len(prompt) % fs == 0, f"prompt of {len(prompt)} tokens is not whole {fs}-token frames"
    if model.config.vocab_size < layout.vocab_size:
        raise ValueError(f"the model knows {model.config.vocab_size} token ids, the tokenizer layout needs "
                        f"{layout.vocab_size}: the checkpoint was trained on another codec")
    context = torch.as_tensor(layout.audio_context() if context is None else context, dtype=torch.long)
    head = torch.cat([context.reshape(-1).to(prompt.device), prompt])  # every training document starts with BOUNDARY
    grammar = grammar or Grammar(layout, model.config.vocab_size, device)
    state = grammar.start(head, num_samples)  # (B,)
    keep = keep_frames(layout, block_size) * fs
    n_ctx = len(head)
    buf = torch.empty(num_samples, n_ctx + n_frames * fs, dtype=torch.long, device=device)  # every token, in order
    buf[:, :n_ctx] = head.to(device)
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
        logits = grammar.mask(logits[:, -1, :].float(), state)  # (B, V)
        buf[:, n:n + 1] = sample_next(logits, temperature, top_k, top_p, generator)
        state = grammar.advance(state, buf[:, n])
        n += 1
        if phase == fs - 1:
            yield buf[:, n - fs:n]
            if grammar.can_end and bool(grammar.ended(state).all()):  # one device sync per frame
                return


def generate_tokens(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, **kwargs) -> torch.Tensor:
    """Prompt + up to n_frames new frames as one token stream (num_samples, len(prompt) + k * frame_size).
    kwargs are sample_frames' (num_samples, temperature, top_k, top_p, generator, use_cache, context, grammar)."""
    frames = list(sample_frames(model, layout, prompt, n_frames, **kwargs))
    assert frames, f"n_frames={n_frames}: nothing to generate"
    p = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    return torch.cat([p.to(frames[0].device).expand(frames[0].shape[0], -1), *frames], dim=1)


def cut_at_end(tokens: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated audio (B, k * frame_size) whose rows may have ended (AUDIO_END from a frame start on) ->
    (the same with every frame from the end on replaced by a code-0 frame, so the batch decodes together,
    (B,) the number of frames before each row's end: what to keep of its audio)."""
    frames = tokens.reshape(tokens.shape[0], -1, layout.frame_size)  # (B, k, frame_size)
    ended = frames[:, :, 0] == layout.special_tokens.get("audio_end", -1)  # (B, k); from a row's end on, all True
    kept = torch.where(ended.any(dim=1), ended.int().argmax(dim=1), frames.shape[1])
    filler = torch.as_tensor(layout.frame_lo, device=tokens.device)
    return torch.where(ended[..., None], filler, frames).reshape(tokens.shape), kept


def transcribe(model, layout: Layout, audio: torch.Tensor, max_tokens: int, text_ok: torch.Tensor | None = None,
               **kwargs) -> list[int]:
    """Audio ids (1-D, whole frames) -> the text ids the model writes after them (not TEXT_END): a transcription
    item [audio][text] continued from its TEXT_START, up to TEXT_END or max_tokens. text_ok as in Grammar; kwargs
    are sample_frames' (temperature, top_k, top_p, generator, use_cache); temperature=0 is greedy."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: transcription needs room for at least one text token")
    device = model.lm_head.weight.device
    grammar = Grammar(layout, model.config.vocab_size, device, text_ok)
    context = torch.as_tensor(layout.transcript_context(torch.as_tensor(audio).cpu().numpy()))
    n = -(-max_tokens // layout.frame_size)
    chunks = list(sample_frames(model, layout, None, n, context=context, grammar=grammar, **kwargs))
    ids = torch.cat(chunks, dim=1)[0, :max_tokens].tolist()
    end = layout.special("text_end")
    return ids[:ids.index(end)] if end in ids else ids


# -----------------------------------------------------------------------------
# decoding while generating

class StreamDecoder:
    """Turns frames into audio as they arrive. A chunk of `chunk_frames` is decoded with CODEC_CONTEXT_FRAMES
    real frames on each side and only its middle is kept, so chunk edges sound (and are) the same as one pass.

    A row may end (AUDIO_END at a frame start, then end tokens, as sample_frames gives them): ends[row] is then its
    number of frames, its audio stops there, decoded as the end of a stream (no right context), and is silence
    after it."""

    def __init__(self, tok: AudioTokenizer, chunk_frames: int, context_frames: int = CODEC_CONTEXT_FRAMES,
                 max_frames: int = DECODE_FRAMES):
        self.tok, self.chunk, self.context, self.max_frames = tok, chunk_frames, context_frames, max_frames
        self.frames: list[torch.Tensor] = []  # (B, frame_size) each, all so far
        self.done = 0  # frames already turned into audio
        self.ends: list[int | None] = []  # per row: frames before its AUDIO_END, None while it goes on

    def _codec(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, F * frame_size) -> (B, F * frame_hop). The codec's activations grow with rows x frames: a few rows at
        a time, so peak memory is bounded by max_frames whatever the batch size."""
        rows = max(1, self.max_frames // (tokens.shape[1] // self.tok.layout.frame_size))
        return torch.cat([self.tok.decode_codes(self.tok.layout.tokens_to_codes(t)) for t in tokens.split(rows)])

    def _decode(self, stop: int) -> torch.Tensor:
        """Audio (B, samples) of frames [done, stop), decoded with context on both sides."""
        lo, hi = max(0, self.done - self.context), min(len(self.frames), stop + self.context)
        tokens, _ = cut_at_end(torch.cat(self.frames[lo:hi], dim=1), self.tok.layout)  # (B, (hi - lo) * frame_size)
        audio = self._codec(tokens)
        hop, fs = self.tok.frame_hop, self.tok.layout.frame_size
        for row, end in enumerate(self.ends):  # rows that end in this window: decode up to the end only
            if end is not None and end < hi:
                audio[row] = 0.0
                if end > lo:
                    audio[row, :(end - lo) * hop] = self._codec(tokens[row:row + 1, :(end - lo) * fs])[0]
        audio = audio[:, (self.done - lo) * hop:(stop - lo) * hop]
        self.done = stop
        return audio

    def push(self, frames: torch.Tensor) -> torch.Tensor | None:
        """Add frames (B, k * frame_size); returns the audio that is now final, or None."""
        new = frames.split(self.tok.layout.frame_size, dim=1)
        end_id = self.tok.layout.special_tokens.get("audio_end")
        if not self.ends:
            self.ends = [None] * frames.shape[0]
        if end_id is not None and any(e is None for e in self.ends):
            ended = (torch.stack([f[:, 0] for f in new], dim=1) == end_id).cpu()  # (B, k), one sync per push
            for row in torch.nonzero(ended.any(dim=1)).reshape(-1).tolist():
                if self.ends[row] is None:
                    self.ends[row] = len(self.frames) + int(ended[row].int().argmax())
        self.frames.extend(new)
        if len(self.frames) - self.done >= self.chunk + self.context:
            return self._decode(len(self.frames) - self.context)
        return None

    def flush(self) -> torch.Tensor | None:
        """The audio of every frame not yet returned (the end of the stream needs no right context)."""
        return self._decode(len(self.frames)) if self.done < len(self.frames) else None


def decode_in_chunks(tok: AudioTokenizer, tokens: torch.Tensor, chunk_frames: int = DECODE_FRAMES) -> torch.Tensor:
    """(B, n_frames * frame_size) tokens -> (B, n_frames * frame_hop) audio, decoded 20 s at a time with codec
    context on both sides, so memory stays bounded however long the samples are."""
    dec = StreamDecoder(tok, chunk_frames)
    pieces = [dec.push(t) for t in tokens.split(chunk_frames * tok.layout.frame_size, dim=1)] + [dec.flush()]
    return torch.cat([p for p in pieces if p is not None], dim=1)
