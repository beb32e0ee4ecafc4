"""Frame-valid sampling with a KV cache, and decoding tokens to audio while they are generated. No I/O.

    from sampling import generate_tokens, StreamDecoder
    tokens = generate_tokens(model, tok.layout, prompt=None, n_frames=120, num_samples=4)   # (4, 120 * frame_size)
    dec = StreamDecoder(tok, chunk_frames=12)          # push frames as they come, get final audio back

Used by generate.py (and by train.py for eval samples). Errors are ValueError with a message for the user.

Decode steps (`decode=`): "eager" runs the model on the filled cache positions only (dynamic shapes: the fewest
bytes to read, the CPU default); "static" runs the static-shape step (a cache of block_size positions, attention
over all of them with a mask); "graph" captures that step once per level as a CUDA graph and replays it (the CUDA
default); "compile" hands it to torch.compile(mode="reduce-overhead"). All give the same tokens for the same seed,
up to float rounding between the eager and static kernels.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
DECODE_MODES = ("auto", "eager", "static", "graph", "compile")


# -----------------------------------------------------------------------------
# sampling

def keep_frames(layout: Layout, block_size: int) -> int:
    """Whole frames kept when the window slides; leaves room for the partial frame in progress plus one token."""
    fs = layout.frame_size
    if block_size < 2 * fs:
        raise ValueError(f"block_size {block_size} is too small to generate: it must hold at least 2 frames "
                         f"({2 * fs} tokens)")
    return max(1, min(int(KEEP_FRACTION * block_size) // fs, (block_size - fs) // fs))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                uniform: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) -> indices (B, 1). uniform (B, V) holds draws in [0, 1) (unused when temperature is 0).

    argmax(probs / E) with E = -log(uniform) ~ Exp(1) picks index i with probability probs[i] (the exponential
    race, torch.multinomial's own one-sample method); unlike multinomial it never reads a value back to the host,
    so it runs inside a CUDA graph. uniform_ + log is 5x faster than exponential_ on a CPU.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        # v[:, -1:], not v[:, [-1]]: a list index is copied to the GPU first, which a CUDA graph capture forbids
        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a code once the codes before it already hold top_p (the most likely one always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # clamped away from 0 so that E is finite and > 0: a code of probability 0 (0 / E) can never win
    e = uniform.clamp_min(torch.finfo(uniform.dtype).tiny).log_().neg_()
    return (probs / e).argmax(dim=-1, keepdim=True)


def decode_attention() -> contextlib.AbstractContextManager:
    """The attention kernels sampling may use. Never cuDNN: on Hopper (H200, torch 2.11) SDPA's default dispatch
    picks it for the one-token step and it builds a new execution plan for every new key length, 48 ms per decode
    forward against 2.2 (memory-efficient) and 2.5 ms (flash). Flash serves the causal prefill, memory-efficient
    the masked static step (flash takes no mask), math whatever neither supports. Training keeps the default
    dispatch: for its fixed shapes cuDNN was the fastest (bench.py generate prints both on CUDA)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class StaticStep:
    """The one-token decode step with static shapes: its KV cache and its inputs and outputs are tensors allocated
    once, so the step can be replayed as a CUDA graph. Set `tok` (B, 1) and `pos` (1,), fill `noise`, then
    step(model, level) -> ids (B, 1).

    mode "static" runs it eagerly; "graph" captures it by hand (torch.cuda.CUDAGraph) once per level, here: no
    compiler, a few forwards to capture (milliseconds), then one launch per token; "compile" uses
    torch.compile(mode="reduce-overhead"), which captures CUDA graphs of its own kernels after compiling (slow to
    warm up). Which is faster is measured by `python bench.py generate` on CUDA. The model is passed to every call,
    never kept: a step is cached per model (static_step) and must not keep it alive.
    """

    def __init__(self, model, batch_size: int, codebook_size: int, knobs: tuple[float, int, float], mode: str,
                 levels: list[int]):
        device = model.lm_head.weight.device
        self.cache, self.knobs, self.mode, self.cs = model.new_kv_cache(batch_size), knobs, mode, codebook_size
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.noise = torch.ones(batch_size, codebook_size, device=device)
        self.out = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.compiled: Callable | None = None
        self.busy = False  # a generation is using it (another one at the same time gets its own)
        if mode == "compile":
            # the cache is mutated in place by every step: marked static, the compiled graphs write it where it is
            # instead of copying it in and out
            torch._dynamo.mark_static_address(self.cache.k)
            torch._dynamo.mark_static_address(self.cache.v)
            self.compiled = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True)
        if mode == "graph":
            # the kernels are chosen at capture and replayed as they are; streams and graphs belong to the
            # current device, so make it the model's (cuda:1 works too)
            with decode_attention(), torch.cuda.device(device):
                pool = torch.cuda.graph_pool_handle()  # the level graphs run one at a time: they share memory
                self.graphs = {level: self._capture(model, level, pool) for level in sorted(set(levels))}

    def _forward(self, model, tok: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        lo = level * self.cs
        logits, _ = model(tok, kv_cache=self.cache, input_pos=pos, vocab_range=(lo, lo + self.cs))
        return sample_next(logits[:, -1, :].float(), *self.knobs, noise) + lo

    def _capture(self, model, level: int, pool) -> torch.cuda.CUDAGraph:
        # warm up on a side stream first (cuBLAS handles and workspaces are created outside the capture); the
        # warm-up steps write position `pos` of the cache, which a prefill or a step fills before it is read
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.out.copy_(self._forward(model, self.tok, self.pos, self.noise, level))
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.out.copy_(self._forward(model, self.tok, self.pos, self.noise, level))
        return graph

    def __call__(self, model, level: int) -> torch.Tensor:
        if self.mode == "graph":
            with torch.cuda.device(self.out.device):
                self.graphs[level].replay()
            return self.out
        with decode_attention():
            if self.mode == "compile":
                return self.compiled(model, self.tok, self.pos, self.noise, level)
            return self._forward(model, self.tok, self.pos, self.noise, level)


# the static steps of each model, by batch size, sampling knobs and mode: captured (or compiled) once, replayed by
# every later generation; they go when the model goes
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_step(model, batch_size: int, codebook_size: int, knobs: tuple[float, int, float], mode: str,
                levels: list[int]) -> StaticStep:
    """The model's StaticStep for this batch size, knobs and mode: made at the first request, then reused (its cache
    and graphs point at the model's weights: a model moved with .to() gets new ones)."""
    w = model.lm_head.weight
    key = (batch_size, codebook_size, knobs, mode, w.device, w.dtype, w.data_ptr())
    steps = _STEPS.setdefault(model, {})
    if key not in steps or steps[key].busy:
        step = StaticStep(model, batch_size, codebook_size, knobs, mode, levels)
        if key not in steps:
            steps[key] = step
        return step
    return steps[key]


@torch.no_grad()
def sample_frames(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, num_samples: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, use_cache: bool = True,
                  decode: str = "auto") -> Iterator[torch.Tensor]:
    """Yield n_frames new frames, each (num_samples, frame_size), continuing [BOUNDARY] + prompt (whole frames).

    use_cache=False recomputes the whole window for every token (nanoGPT's generate); same tokens, much slower.
    decode: how cached steps run (see the module docstring); "auto" is "graph" on CUDA and "eager" elsewhere.
    Memory does not grow with n_frames: the window, the cache and the graphs are allocated once.
    """
    fs, cs, block_size = layout.frame_size, layout.codebook_size, model.config.block_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
    prompt = prompt.reshape(-1)
    assert len(prompt) % fs == 0, f"prompt of {len(prompt)} tokens is not whole {fs}-token frames"
    if model.config.vocab_size < layout.vocab_size:
        raise ValueError(f"the model knows {model.config.vocab_size} token ids, the tokenizer layout needs "
                         f"{layout.vocab_size}: the checkpoint was trained on another codec")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "eager"
    if decode in ("graph", "compile") and device.type != "cuda":
        raise ValueError(f"decode={decode!r} captures CUDA graphs: it needs the model on a CUDA device, not {device}")
    levels = [int(level) for level in layout.frame_levels]  # position in the frame -> the level sampled there
    keep = keep_frames(layout, block_size) * fs
    # the window the model sees, at most block_size tokens plus the one just sampled; it always starts on a frame
    # start, so its position n holds frame position (n - n0) % fs, n0 being where the prompt's frames start
    ctx = torch.empty(num_samples, block_size + 1, dtype=torch.long, device=device)
    start = torch.cat([torch.tensor([layout.boundary_id]), prompt])  # every training document starts with BOUNDARY
    if len(start) > block_size:
        start = prompt[-keep:]
    n = len(start)
    ctx[:, :n] = start.to(device)
    step, cache = None, None
    if use_cache and decode != "eager":
        step = static_step(model, num_samples, cs, (temperature, top_k, top_p), decode, levels)
        cache = step.cache
    elif use_cache:
        cache = model.new_kv_cache(num_samples)
    # the sampler's random draws, made outside the model step in the same order whatever runs it: same seed,
    # same tokens
    noise = step.noise if step is not None else torch.empty(num_samples, cs, device=device)
    if step is not None:
        step.busy = True
    try:
        prefill = True
        for i in range(n_frames * fs):
            phase = i % fs  # the prompt is whole frames, so this is the position inside the current frame
            lo = levels[phase] * cs
            if n > block_size:
                # slide: keep the last whole frames that fit plus the partial frame, so positions restart at 0 on a
                # frame start, and re-prefill the cache from the kept window
                m = keep + phase
                ctx[:, :m] = ctx[:, n - m:n].clone()
                n, prefill = m, True
            if temperature > 0:
                noise.uniform_(generator=generator)
            if step is not None and not prefill:
                step.tok.copy_(ctx[:, n - 1:n])
                step.pos.fill_(n - 1)
                ctx[:, n:n + 1] = step(model, levels[phase])
            else:
                with decode_attention():
                    if cache is None:
                        logits, _ = model(ctx[:, :n], vocab_range=(lo, lo + cs))
                    elif prefill:
                        cache.reset()
                        logits, _ = model(ctx[:, :n], kv_cache=cache, vocab_range=(lo, lo + cs))
                        prefill = False
                    else:
                        logits, _ = model(ctx[:, n - 1:n], kv_cache=cache, vocab_range=(lo, lo + cs))
                ctx[:, n:n + 1] = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, noise) + lo
            n += 1
            if phase == fs - 1:
                yield ctx[:, n - fs:n].clone()
    finally:  # also when the caller stops early: the step is free for the next generation
        if step is not None:
            step.busy = False


def generate_tokens(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, **kwargs) -> torch.Tensor:
    """Prompt + n_frames new frames as one token stream (num_samples, len(prompt) + n_frames * frame_size).
    kwargs are sample_frames' (num_samples, temperature, top_k, top_p, generator, use_cache, decode)."""
    frames = list(sample_frames(model, layout, prompt, n_frames, **kwargs))
    assert frames, f"n_frames={n_frames}: nothing to generate"
    p = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    return torch.cat([p.to(frames[0].device).expand(frames[0].shape[0], -1), *frames], dim=1)


# -----------------------------------------------------------------------------
# decoding while generating

class StreamDecoder:
    """Turns frames into audio as they arrive. A chunk of `chunk_frames` is decoded with CODEC_CONTEXT_FRAMES
    real frames on each side and only its middle is kept, so chunk edges sound (and are) the same as one pass.
    Only the frames a later chunk still needs are kept, so memory stays flat however long the stream."""

    def __init__(self, tok: AudioTokenizer, chunk_frames: int, context_frames: int = CODEC_CONTEXT_FRAMES,
                 max_frames: int = DECODE_FRAMES):
        self.tok, self.chunk, self.context, self.max_frames = tok, chunk_frames, context_frames, max_frames
        self.frames: list[torch.Tensor] = []  # (B, frame_size) each: frames first, first + 1, ... of the stream
        self.first = 0  # index in the stream of self.frames[0]
        self.done = 0  # frames of the stream already turned into audio

    @property
    def n_frames(self) -> int:
        """Frames pushed so far."""
        return self.first + len(self.frames)

    def _decode(self, stop: int) -> torch.Tensor:
        """Audio (B, samples) of frames [done, stop), decoded with context on both sides."""
        lo, hi = max(0, self.done - self.context), min(self.n_frames, stop + self.context)
        tokens = torch.cat(self.frames[lo - self.first:hi - self.first], dim=1)  # (B, (hi - lo) * frame_size)
        # the codec's activations grow with rows x frames: decode a few rows at a time, so peak memory is bounded by
        # max_frames whatever the batch size
        rows = max(1, self.max_frames // (hi - lo))
        audio = torch.cat([self.tok.decode_codes(self.tok.layout.tokens_to_codes(t)) for t in tokens.split(rows)])
        hop = self.tok.frame_hop
        audio = audio[:, (self.done - lo) * hop:(stop - lo) * hop]
        self.done = stop
        drop = max(0, self.done - self.context) - self.first  # no later chunk reaches back further
        del self.frames[:drop]
        self.first += drop
        return audio

    def push(self, frames: torch.Tensor) -> torch.Tensor | None:
        """Add frames (B, k * frame_size); returns the audio that is now final, or None."""
        self.frames.extend(frames.split(self.tok.layout.frame_size, dim=1))
        if self.n_frames - self.done >= self.chunk + self.context:
            return self._decode(self.n_frames - self.context)
        return None

    def flush(self) -> torch.Tensor | None:
        """The audio of every frame not yet returned (the end of the stream needs no right context)."""
        return self._decode(self.n_frames) if self.done < self.n_frames else None


def decode_in_chunks(tok: AudioTokenizer, tokens: torch.Tensor, chunk_frames: int = DECODE_FRAMES) -> torch.Tensor:
    """(B, n_frames * frame_size) tokens -> (B, n_frames * frame_hop) audio, decoded 20 s at a time with codec
    context on both sides, so memory stays bounded however long the samples are."""
    dec = StreamDecoder(tok, chunk_frames)
    pieces = [dec.push(t) for t in tokens.split(chunk_frames * tok.layout.frame_size, dim=1)] + [dec.flush()]
    return torch.cat([p for p in pieces if p is not None], dim=1)
