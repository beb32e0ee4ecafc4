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
    elsewhere (other levels and every special token)."""
    ids = torch.arange(vocab_size)
    lo = torch.as_tensor(layout.frame_levels * layout.codebook_size)[:, None]  # (frame_size, 1)
    allowed = (ids >= lo) & (ids < lo + layout.codebook_size)  # (frame_size, vocab_size)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(device)


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
                  generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield n_frames new frames, each (num_samples, frame_size), continuing [BOUNDARY] + prompt (whole frames).

    use_cache=False recomputes the whole window for every token (nanoGPT's generate); same tokens, much slower.
    """
    fs, block_size = layout.frame_size, model.config.block_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
    prompt = prompt.reshape(-1)
    assert len(prompt) % fs == 0, f"prompt of {len(prompt)} tokens is not whole {fs}-token frames"
    if model.config.vocab_size < layout.vocab_size:
        raise ValueError(f"the model knows {model.config.vocab_size} token ids, the tokenizer layout needs "
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

    def __init__(self, tok: AudioTokenizer, chunk_frames: int, context_frames: int = CODEC_CONTEXT_FRAMES,
                 max_frames: int = DECODE_FRAMES):
        self.tok, self.chunk, self.context, self.max_frames = tok, chunk_frames, context_frames, max_frames
        self.frames: list[torch.Tensor] = []  # (B, frame_size) each, all so far
        self.done = 0  # frames already turned into audio

    def _decode(self, stop: int) -> torch.Tensor:
        """Audio (B, samples) of frames [done, stop), decoded with context on both sides."""
        lo, hi = max(0, self.done - self.context), min(len(self.frames), stop + self.context)
        tokens = torch.cat(self.frames[lo:hi], dim=1)  # (B, (hi - lo) * frame_size)
        # the codec's activations grow with rows x frames: decode a few rows at a time, so peak memory is bounded by
        # max_frames whatever the batch size
        rows = max(1, self.max_frames // (hi - lo))
        audio = torch.cat([self.tok.decode_codes(self.tok.layout.tokens_to_codes(t)) for t in tokens.split(rows)])
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


def decode_in_chunks(tok: AudioTokenizer, tokens: torch.Tensor, chunk_frames: int = DECODE_FRAMES) -> torch.Tensor:
    """(B, n_frames * frame_size) tokens -> (B, n_frames * frame_hop) audio, decoded 20 s at a time with codec
    context on both sides, so memory stays bounded however long the samples are."""
    dec = StreamDecoder(tok, chunk_frames)
    pieces = [dec.push(t) for t in tokens.split(chunk_frames * tok.layout.frame_size, dim=1)] + [dec.flush()]
    return torch.cat([p for p in pieces if p is not None], dim=1)
