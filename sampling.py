"""Frame-valid sampling with a KV cache, and decoding tokens to audio while they are generated. No I/O.

    from sampling import generate_tokens, StreamDecoder
    tokens = generate_tokens(model, tok.layout, prompt=None, n_frames=120, num_samples=4)   # (4, 120 * frame_size)
    dec = StreamDecoder(tok, chunk_frames=12)          # push frames as they come, get final audio back

Used by generate.py (and by train.py for eval samples). Errors are ValueError with a message for the user.

sample_frames is one loop over one decode-step interface (DecodeStep: prefill the cache from the window, then
sample a frame); `decode=` picks the step: "eager" (EagerStep) runs the model on the filled cache positions only
(dynamic shapes: the fewest bytes to read, the CPU default); "static" (StaticStep) runs a whole frame of
static-shape steps (a cache of block_size positions, attention over the first 1/8, 1/4, 1/2 or all of them with a
mask, the sampler and the grammar between them); "graph" (GraphStep) captures that frame once per attention length
as a CUDA graph and replays it (the CUDA default); "compile" compiles the one-token step with inductor
(compiled_token_step): on CUDA inside the captured frame (CompiledStep), on a CPU as C++ code with the attention
length a dynamic size (CompiledCpuStep). All give the same tokens for the same seed, up to float rounding between
the kernels. A PrefixCache (prefix=) keeps one row's cache from one generation to the next, so a conversation's
reply runs the model on its new turn only (chat.py); stream_text yields a reply's text as it is written.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from codec import AudioTokenizer
from tokenizer import Layout

# the SNAC decoder is convolutional (a frame's audio depends on its neighbours): streaming decodes this many frames
# on each side of a chunk and keeps only the middle, which matches one pass over the stream to float rounding
CODEC_CONTEXT_FRAMES = 4
# frames of audio one codec call decodes at most (all rows together; 240 frames = 20 s at 24 kHz): bounds the
# codec's activations
DECODE_FRAMES = 240
# when the context is full, the window keeps about this fraction of block_size (whole frames): the larger, the
# more history the model sees, the smaller, the fewer re-prefills (one forward of the window each)
KEEP_FRACTION = 0.75
DECODE_MODES = ("auto", "eager", "static", "graph", "compile")


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
    The audio-only layout has no end token, so there a row is audio forever.
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

    def follow(self, state: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New ids (B, 1) sampled in `state` -> (the same, where rows whose audio has ended repeat AUDIO_END, which
        the level ranges do not hold; the state after them). Every decode step applies it after every token."""
        if not self.can_end:
            return new, state
        new = torch.where(state[:, None] == self.AUDIO_DONE, self.audio_end, new)
        return new, self.advance(state, new[:, 0])

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
                uniform: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) -> indices (B, 1). uniform (B, V) holds draws in [0, 1) (unused when temperature is 0).

    argmax(probs / E) with E = -log(uniform) ~ Exp(1) picks index i with probability probs[i] (the exponential
    race, torch.multinomial's own one-sample method); unlike multinomial it never reads a value back to the host,
    so it runs inside a CUDA graph. uniform_ + log, not exponential_: the faster of the two on a CPU.
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


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor, filters: bool = True) -> torch.Tensor:
    """sample_next with each row's own knobs, (B, 1) tensors (temperature 0 = greedy, top_k 0 and top_p 1 = off):
    row by row the ids sample_next picks with that row's knobs and draws, with no read back to the host (a CUDA
    graph holds it for any mix of requests). filters=False skips top-k and top-p (no row uses them): two sorts less.
    """
    greedy = logits.argmax(dim=-1, keepdim=True)
    logits = logits / torch.where(temperature > 0, temperature, 1.0)
    if filters:
        # the k-th largest logit of each row, as topk's v[:, -1:] (k = 0: the row keeps all of them)
        v = torch.sort(logits, dim=-1, descending=True).values
        kth = v.gather(-1, (torch.where(top_k > 0, top_k, logits.size(-1)).clamp(max=logits.size(-1)) - 1))
        logits = logits.masked_fill((logits < kth) & (top_k > 0), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if filters:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs > top_p) & (top_p < 1.0)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    e = uniform.clamp_min(torch.finfo(uniform.dtype).tiny).log_().neg_()
    return torch.where(temperature > 0, (probs / e).argmax(dim=-1, keepdim=True), greedy)


def decode_context(device_type: str) -> contextlib.AbstractContextManager:
    """What every model call of sampling runs under: the attention kernels it may use, and no autocast.

    Never cuDNN attention: on Hopper SDPA's default dispatch picks it for one-token decode steps, and it builds a new
    execution plan for every new key length (`python bench.py generate` times the backends). Flash serves the causal
    prefill, memory-efficient the masked one-token step (flash takes no mask), math whatever neither supports.
    Training keeps the default dispatch: for its fixed shapes cuDNN is fast.

    Autocast off: sampling runs in the weights' dtype (cast the model for half precision, as generate.py does).
    Under a caller's autocast a static step's new keys would come out in another dtype than its cache's, and a
    captured graph would keep reading autocast's cast copies of the weights, freed when that autocast exits."""
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    if device_type in ("cpu", "cuda", "mps"):  # the device types autocast knows
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def frame_ranges(layout: Layout, vocab_size: int, grammar: Grammar) -> list[tuple[int, int, torch.Tensor | None]]:
    """The ids each frame position may take, (lo, hi, the grammar's additive mask over them or None): a level's
    codes, and at a frame start also AUDIO_END's range where the layout has one."""
    ranges = []
    for phase in range(layout.frame_size):
        lo = int(layout.frame_lo[phase])
        end = phase == 0 and grammar.audio_end >= 0
        ranges.append((lo, vocab_size if end else lo + layout.codebook_size,
                       grammar.masks[0, lo:vocab_size] if end else None))
    return ranges


def token_step(model, tok: torch.Tensor, cache, pos: torch.Tensor, noise: torch.Tensor,
               knobs: tuple[float, int, float], lo: int, hi: int, mask: torch.Tensor | None,
               attend: int | None = None) -> torch.Tensor:
    """One static-shape decode step: tok (B, 1) at position pos (1,) -> the next ids (B, 1), sampled with knobs
    (temperature, top_k, top_p) and noise (B, >= hi - lo) among ids lo..hi-1 (mask: additive over them, or None).
    attend: the cache positions attention reads, >= pos + 1 (default all; the rest are masked)."""
    logits, _ = model(tok, kv_cache=cache, input_pos=pos, attend=attend, vocab_range=(lo, hi))
    logits = logits[:, -1, :].float()
    return sample_next(logits + mask if mask is not None else logits, *knobs, noise[:, :hi - lo]) + lo


_COMPILED_STEPS: dict[str, Callable] = {}


def compiled_token_step(device_type: str) -> Callable:
    """token_step compiled by inductor, once per process and device type, for every model, position and id range:
    decode="compile". dynamic=True: the attention length and the id range are symbolic sizes, so one graph serves
    every step (in the text+audio layout frame starts get a second one, as their id range is longer than 4096).

    On a CPU (CompiledCpuStep) it fuses the many small ops between a batch-1 step's matrix-vector products, which
    eager runs as separate dispatches over caches the weights just flushed, into a few C++ loops; cpp_wrapper makes
    the graph's calls from C++, not Python. The compile takes tens of seconds once per process, so eager stays the
    default there. On CUDA (CompiledStep) the frame graph removes the launches and the compile fuses the kernels
    (layer norms, residual adds, the sampler); one compile serves every captured attention length.
    """
    if device_type not in _COMPILED_STEPS:
        # a graph per model shape, batch size and sampling knobs: past dynamo's default of 8 it would fall back to
        # eager with a warning
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        options = {"cpp_wrapper": True} if device_type == "cpu" else {}
        _COMPILED_STEPS[device_type] = torch.compile(token_step, dynamic=True, fullgraph=True, options=options)
    return _COMPILED_STEPS[device_type]


def step_inputs(model, batch_size: int, width: int) -> tuple:
    """The KV cache, last-token (B, 1) and noise (B, width + 1) buffers a static-shape step reads, made so that dynamo
    never ties a symbolic size of a compiled step to one of theirs (each tie is a compile more, mid-generation): the
    cache is 8 positions longer than attention ever reads (a length equal to the cache's is guarded on), the noise
    one wider than any id range (so is a slice that is all of it), and their sizes are marked static (a symbolic
    size that equals one of them at first would be guarded on too). A step is given whole tensors, not views: a
    view's offset changes every step, and at batch 1 it can equal a size."""
    device = model.lm_head.weight.device
    cache = model.new_kv_cache(batch_size, max_len=model.config.block_size + 8)
    tok = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    noise = torch.ones(batch_size, width + 1, device=device)
    for t in cache.k + cache.v + [tok, noise]:
        torch._dynamo.mark_static(t)
    return cache, tok, noise


# -----------------------------------------------------------------------------
# decode steps: one per decode mode, behind one interface

class DecodeStep:
    """What sample_frames' loop runs, one frame at a time (gpt-fast's decode_one_token, a frame wide):

        step.prefill(model, ctx, n)      # the window ctx[:, :n] (n on a frame start) fills a fresh cache
        step.noise.uniform_(generator)   # (frame_size, B, width): the frame's random draws, made by the loop
        frame, state = step.frame(model, ctx, n, state)  # the next frame (B, frame_size) after ctx[:, :n]

    state is the grammar's (B,), before and after the frame. `with step:` marks it busy while a generation uses it
    (a cached step is never shared by two at the same time). The model is passed to every call, never kept: a
    static step is cached per model (static_step) and must not keep it alive."""
    busy = False
    noise: torch.Tensor

    def prefill(self, model, ctx: torch.Tensor, n: int) -> None:
        raise NotImplementedError

    def frame(self, model, ctx: torch.Tensor, n: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __enter__(self) -> "DecodeStep":
        self.busy = True
        return self

    def __exit__(self, *exc) -> None:
        self.busy = False


class PrefixCache:
    """A one-row KV cache kept from one generation to the next, with the ids it holds. A generation given it
    (sample_frames' prefix) runs the model only on what follows the ids its window shares with them, so a
    conversation's earlier turns are not run again for every reply; a window that starts otherwise (the oldest
    turns left, or the window slid) is run whole."""

    def __init__(self, model):
        self.kv = model.new_kv_cache(1)
        self.ids = torch.zeros(0, dtype=torch.long)  # what self.kv holds, position by position
        self.reused = 0  # positions the latest generation found in the cache
        self.ran = 0  # ids run by the prefills of every generation given this cache

    def common(self, ids: torch.Tensor) -> int:
        """How many leading ids of `ids` the cache already holds (and keeps: it is about to be written past them)."""
        m = min(len(self.ids), len(ids))
        same = self.ids[:m] == ids[:m].cpu()
        self.reused = m if bool(same.all()) else int(same.to(torch.int8).argmin())
        return self.reused

    def hold(self, window: torch.Tensor) -> None:
        """After a generation: the cache holds the first kv.pos ids of its final window (1-D)."""
        self.ids = window[:self.kv.pos].cpu().clone()


class EagerStep(DecodeStep):
    """decode="eager": the KV cache attended over its filled positions only (dynamic shapes: the fewest bytes to
    read, the CPU default), one token at a time. Also the text path (ranges None): every id of the vocabulary,
    under the grammar's mask for each row's state."""

    def __init__(self, model, batch_size: int, knobs: tuple[float, int, float],
                 ranges: list[tuple[int, int, torch.Tensor | None]] | None, grammar: Grammar,
                 prefix: "PrefixCache | None" = None, cache=None):
        vocab, fs = model.config.vocab_size, grammar.fs
        self.knobs, self.grammar, self.text = knobs, grammar, ranges is None
        self.ranges = [(0, vocab, None)] * fs if ranges is None else ranges
        self.width = max(hi - lo for lo, hi, _ in self.ranges)
        self.noise = torch.empty(fs, batch_size, self.width, device=model.lm_head.weight.device)
        self.cache = cache or (model.new_kv_cache(batch_size) if prefix is None else prefix.kv)
        self.prefix, self.first = prefix, True  # only the first prefill can reuse: a slide moves every position
        self.logits: torch.Tensor | None = None  # the prefill's, for the frame's first token

    def prefill(self, model, ctx: torch.Tensor, n: int) -> None:
        start = 0
        if self.prefix is not None:
            start = self.prefix.common(ctx[0, :n - 1]) if self.first else 0  # the last id runs: its logits lead
            self.prefix.ran += n - start
        self.first, self.cache.pos = False, start
        with decode_context(ctx.device.type):
            logits, _ = model(ctx[:, start:n], kv_cache=self.cache, vocab_range=self.ranges[0][:2])
        self.logits = logits[:, -1, :].float()

    def token(self, model, tok: torch.Tensor, pos: int, phase: int, state: torch.Tensor) -> torch.Tensor:
        """The ids (B, 1) after tok (B, 1) at position pos, frame position phase (the prefill's logits first)."""
        lo, hi, mask = self.ranges[phase]
        if self.logits is None:
            logits, _ = model(tok, kv_cache=self.cache, vocab_range=(lo, hi))
            logits = logits[:, -1, :].float()
        else:
            logits, self.logits = self.logits, None
        if self.text:
            logits = self.grammar.mask(logits, state)
        elif mask is not None:
            logits = logits + mask
        return sample_next(logits, *self.knobs, self.noise[phase, :, :hi - lo]) + lo

    def frame(self, model, ctx: torch.Tensor, n: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok, new = ctx[:, n - 1:n], []
        with decode_context(ctx.device.type):
            for phase in range(self.grammar.fs):
                tok, state = self.grammar.follow(state, self.token(model, tok, n - 1 + phase, phase, state))
                new.append(tok)
        return torch.cat(new, dim=1), state


class CompiledCpuStep(EagerStep):
    """decode="compile" on a CPU: EagerStep's prefill and first token, then compiled_token_step for the others, with
    attention over the filled positions rounded up to 8 (a dynamic size that is never 1, which dynamo specialises),
    every frame position with a mask (zeros where its range has none: one graph, not two)."""

    def __init__(self, model, batch_size: int, knobs: tuple[float, int, float],
                 ranges: list[tuple[int, int, torch.Tensor | None]], grammar: Grammar):
        cache, self.tok, self.step_noise = step_inputs(model, batch_size, max(hi - lo for lo, hi, _ in ranges))
        super().__init__(model, batch_size, knobs, ranges, grammar, cache=cache)
        device = self.noise.device
        self.masks = [torch.zeros(hi - lo, device=device) if m is None else m.clone() for lo, hi, m in ranges]
        self.fn = compiled_token_step("cpu")

    def token(self, model, tok: torch.Tensor, pos: int, phase: int, state: torch.Tensor) -> torch.Tensor:
        if self.logits is not None:
            return super().token(model, tok, pos, phase, state)
        self.tok.copy_(tok)
        self.step_noise[:, :self.width].copy_(self.noise[phase])
        lo, hi, _ = self.ranges[phase]
        try:
            return self.fn(model, self.tok, self.cache, torch.tensor([pos], device=tok.device), self.step_noise,
                           self.knobs, lo, hi, self.masks[phase], -(-(pos + 1) // 8) * 8)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise ValueError(f"decode=compile: torch.compile could not build the decode step "
                             f"({str(e).splitlines()[0]}); it needs a working C++ compiler (g++ or clang, or "
                             "CXX=<path>); decode=eager needs none") from None


class StaticStep(DecodeStep):
    """decode="static": a whole frame of decode steps with static shapes, run eagerly. Its KV cache and its inputs
    and outputs are tensors allocated once, so the frame can be replayed as one CUDA graph (GraphStep). Set `tok`
    (B, 1), the last token in context, `pos` (1,), its position, and `state` (B,), the grammar's; fill `noise`
    (frame_size, B, width); then step(model, pos + frame_size) -> (ids (B, frame_size), the state after them).
    Frame position p samples among the ids ranges[p] = (lo, hi, additive mask over them or None); rows whose audio
    has ended repeat AUDIO_END."""

    def __init__(self, model, batch_size: int, knobs: tuple[float, int, float],
                 ranges: list[tuple[int, int, torch.Tensor | None]], grammar: Grammar):
        device, block_size = model.lm_head.weight.device, model.config.block_size
        self.knobs, self.ranges, self.grammar = knobs, ranges, grammar
        fs = len(ranges)
        width = max(hi - lo for lo, hi, _ in ranges)
        # a compiled step gets its row of noise in step_noise (step_inputs), not as a view of self.noise
        self.cache, self.tok, self.step_noise = step_inputs(model, batch_size, width)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.state = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.noise = torch.ones(fs, batch_size, width, device=device)
        self.out = torch.zeros(batch_size, fs, dtype=torch.long, device=device)
        self.out_state = torch.zeros(batch_size, dtype=torch.long, device=device)
        # a frame attends over the first L cache positions, L the smallest of these lengths that holds it (multiples
        # of 8, as new_kv_cache's max_len): early in a generation the softmax reads 256 keys, not 2048
        self.lengths = sorted({-(-max(fs, block_size >> k) // 8) * 8 for k in range(4)})

    def _forward(self, model, tok: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, phase: int,
                 length: int) -> torch.Tensor:
        """One token: tok (B, 1) at position pos -> the next ids (B, 1), sampled among ranges[phase], attending
        over cache positions 0 .. length-1."""
        return token_step(model, tok, self.cache, pos, noise, self.knobs, *self.ranges[phase], length)

    def _frame(self, model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok, state, new = self.tok, self.state, []
        for phase in range(len(self.ranges)):
            tok, state = self.grammar.follow(state, self._forward(model, tok, self.pos + phase, self.noise[phase],
                                                                  phase, length))  # (B, 1)
            new.append(tok)
        return torch.cat(new, dim=1), state

    def __call__(self, model, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """end: the positions this frame's last step sees, pos + frame_size (pos = tok's position)."""
        with decode_context(self.out.device.type):
            return self._frame(model, next(n for n in self.lengths if n >= end))

    def prefill(self, model, ctx: torch.Tensor, n: int) -> None:
        self.cache.reset()  # the cache takes all but the last token in context: the frame step feeds that one
        if n > 1:
            with decode_context(ctx.device.type):
                model(ctx[:, :n - 1], kv_cache=self.cache, vocab_range=(0, 1))  # logits not needed

    def frame(self, model, ctx: torch.Tensor, n: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.tok.copy_(ctx[:, n - 1:n])
        self.pos.fill_(n - 1)
        self.state.copy_(state)
        return self(model, n - 1 + len(self.ranges))


class GraphStep(StaticStep):
    """decode="graph": StaticStep's frame captured by hand (torch.cuda.CUDAGraph) once per attention length, then
    replayed: no compiler, milliseconds to capture, one launch per frame. A frame, not a token: between captured
    one-token steps, the sampler's random draws, the grammar and the copies would each pay a launch and Python.
    Off CUDA it runs as StaticStep."""

    def __init__(self, model, batch_size: int, knobs: tuple[float, int, float],
                 ranges: list[tuple[int, int, torch.Tensor | None]], grammar: Grammar):
        super().__init__(model, batch_size, knobs, ranges, grammar)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        device = self.out.device
        if device.type == "cuda":
            # the kernels are chosen at capture and replayed as they are; streams and graphs belong to the
            # current device, so make it the model's (cuda:1 works too)
            with decode_context(device.type), torch.cuda.device(device):
                self.graphs = {length: self._capture(model, length) for length in self.lengths}

    def _capture(self, model, length: int) -> torch.cuda.CUDAGraph:
        # warm up on a side stream first (cuBLAS handles and workspaces are created outside the capture); the
        # warm-up frames write positions pos.. of the cache (pos is 0 here), which a prefill or a frame fills before
        # they are read
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._frame(model, length)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (NCCL's watchdog, in training) must not abort the capture. On the
        # warm-up stream, which is on the model's device: torch.cuda.graph's default stream is one per process, made
        # on whichever device captured first
        with torch.cuda.graph(graph, stream=s, capture_error_mode="thread_local"):
            out, state = self._frame(model, length)
            self.out.copy_(out)
            self.out_state.copy_(state)
        return graph

    def __call__(self, model, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.graphs:
            return super().__call__(model, end)
        with torch.cuda.device(self.out.device):
            self.graphs[next(n for n in self.lengths if n >= end)].replay()
        return self.out, self.out_state


class CompiledStep(GraphStep):
    """decode="compile" on CUDA: GraphStep's captured frame with inductor's kernels in it (compiled_token_step), one
    compile for every frame position; torch.compile(mode="reduce-overhead") on the one-token step would capture a
    token per graph and compile each frame position apart. `python bench.py generate` times it against graph."""

    def _forward(self, model, tok: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, phase: int,
                 length: int) -> torch.Tensor:
        self.step_noise[:, :noise.size(1)].copy_(noise)  # a whole tensor, not a view (step_inputs)
        fn = compiled_token_step(tok.device.type)
        return fn(model, tok, self.cache, pos, self.step_noise, self.knobs, *self.ranges[phase], length)


STATIC_STEPS = {"static": StaticStep, "graph": GraphStep, "compile": CompiledStep}
# the static steps of each model, by batch size, sampling knobs and mode: captured (or compiled) once, replayed by
# every later generation; they go when the model goes
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_step(model, batch_size: int, knobs: tuple[float, int, float], mode: str,
                ranges: list[tuple[int, int, torch.Tensor | None]], grammar: Grammar) -> StaticStep:
    """The model's static step (STATIC_STEPS[mode]) for this batch size, knobs, id ranges and grammar: made at the
    first request, then reused (its cache and graph point at the model's weights: a model moved with .to() gets new
    ones). A step in use by a running generation is not handed out again: the caller gets a new one."""
    w = model.lm_head.weight
    spans = tuple((lo, hi, mask is not None) for lo, hi, mask in ranges)  # the masks follow from the spans
    # every weight's address, as a graph has them all baked in (moved away and back, lm_head alone may land where
    # it was)
    where = tuple(p.data_ptr() for p in model.parameters())
    key = (batch_size, knobs, mode, spans, grammar.audio_end, w.device, w.dtype, where)
    steps = _STEPS.setdefault(model, {})
    for stale in [k for k in steps if k[-1] != where]:  # the weights have moved since: their graphs and caches go
        del steps[stale]
    if key not in steps or steps[key].busy:
        step = STATIC_STEPS[mode](model, batch_size, knobs, ranges, grammar)
        if key not in steps:
            steps[key] = step
        return step
    return steps[key]


def decode_step(model, decode: str, batch_size: int, knobs: tuple[float, int, float],
                ranges: list[tuple[int, int, torch.Tensor | None]] | None, grammar: Grammar,
                prefix: PrefixCache | None = None) -> DecodeStep:
    """The step of decode mode `decode` ("auto": graph on CUDA, else eager); text (ranges None) is always eager,
    and so is a generation that continues a PrefixCache (its cache is the dynamic-shape one)."""
    device = model.lm_head.weight.device
    if prefix is not None:
        if batch_size != 1:
            raise ValueError(f"a PrefixCache holds one row; num_samples={batch_size}")
        return EagerStep(model, batch_size, knobs, ranges, grammar, prefix)
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "eager"
    if decode == "graph" and device.type != "cuda":
        raise ValueError(f"decode={decode!r} captures CUDA graphs: it needs the model on a CUDA device, not {device}")
    if decode == "compile" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"decode={decode!r} compiles for CUDA or a CPU, not {device}: use eager or static")
    if ranges is None or decode == "eager":
        return EagerStep(model, batch_size, knobs, ranges, grammar)
    if decode == "compile" and device.type == "cpu":
        return CompiledCpuStep(model, batch_size, knobs, ranges, grammar)
    return static_step(model, batch_size, knobs, decode, ranges, grammar)


# -----------------------------------------------------------------------------
# the sampling loop

@torch.no_grad()
def sample_frames(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, num_samples: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, context: torch.Tensor | None = None,
                  grammar: Grammar | None = None, decode: str = "auto",
                  prefix: PrefixCache | None = None) -> Iterator[torch.Tensor]:
    """Yield up to n_frames new frames, each (num_samples, frame_size), continuing context + prompt (whole frames).

    context: the tokens before the prompt, default layout.audio_context() ([BOUNDARY], then AUDIO_START in the
    text+audio layout); layout.speech_context(text) makes it speak a text. grammar: which ids may come next
    (default Grammar(layout, ...): audio, ending with AUDIO_END where the layout has one); a text grammar after
    layout.transcript_context(audio) writes text, frame_size tokens per yield. Once every row's segment has ended
    sampling stops early; a row that ended first repeats its end token. decode: the decode step (see the module
    docstring). prefix: a PrefixCache the generation starts from and leaves holding its window (one row, eager).
    Memory does not grow with n_frames: the window, the cache and the graphs are allocated once.
    """
    fs, block_size, vocab = layout.frame_size, model.config.block_size, model.config.vocab_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
    prompt = prompt.reshape(-1)
    assert len(prompt) % fs == 0, f"prompt of {len(prompt)} tokens is not whole {fs}-token frames"
    if vocab < layout.vocab_size:
        raise ValueError(f"the model knows {vocab} token ids, the tokenizer layout needs "
                         f"{layout.vocab_size}: the checkpoint was trained on another codec")
    context = torch.as_tensor(layout.audio_context() if context is None else context, dtype=torch.long)
    head = torch.cat([context.reshape(-1), prompt.cpu()])  # every training document starts with BOUNDARY
    grammar = grammar or Grammar(layout, vocab, device)
    state = grammar.start(head, num_samples)  # (B,)
    audio = int(state[0]) < fs  # an audio segment, sampled level by level; else text, over the whole vocabulary
    assert not audio or int(state[0]) == 0, "audio sampling starts on a frame start (whole-frame prompts)"
    keep = keep_frames(layout, block_size) * fs
    # the window the model sees, at most block_size tokens plus the one just sampled; it always starts on a frame
    # start, so its position n holds frame position (n - n0) % fs, n0 being where the prompt's frames start
    ctx = torch.empty(num_samples, block_size + 1, dtype=torch.long, device=device)
    head = head[-keep:] if len(head) + fs - 1 > block_size else head
    n = len(head)
    ctx[:, :n] = head.to(device)
    ranges = frame_ranges(layout, vocab, grammar) if audio else None
    with decode_step(model, decode, num_samples, (temperature, top_k, top_p), ranges, grammar, prefix) as step:
        step.prefill(model, ctx, n)
        try:
            for _ in range(n_frames):
                if n + fs - 1 > block_size:
                    # slide at a frame start: keep the last whole frames that fit, so positions restart at 0 on a
                    # frame start, and re-prefill the cache from the kept window (keep_frames leaves room for a frame)
                    ctx[:, :keep] = ctx[:, n - keep:n].clone()
                    n = keep
                    step.prefill(model, ctx, n)
                if temperature > 0:  # drawn outside the step, in one order whatever runs it: same seed, same tokens
                    step.noise.uniform_(generator=generator)
                frame, state = step.frame(model, ctx, n, state)
                ctx[:, n:n + fs] = frame
                n += fs
                yield ctx[:, n - fs:n].clone()
                if grammar.can_end and bool(grammar.ended(state).all()):  # one device sync per frame
                    return
        finally:  # also when the caller stops early (closes the generator)
            if prefix is not None:
                prefix.hold(ctx[0])


def generate_tokens(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int,
                    sampler: Callable[..., Iterator[torch.Tensor]] = sample_frames, **kwargs) -> torch.Tensor:
    """Prompt + up to n_frames new frames as one token stream (num_samples, len(prompt) + k * frame_size).
    sampler: what yields the frames, sample_frames or another of its arguments; kwargs are its (num_samples,
    temperature, top_k, top_p, generator, context, grammar, and sample_frames' decode)."""
    frames = list(sampler(model, layout, prompt, n_frames, **kwargs))
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
    are sample_frames' (temperature, top_k, top_p, generator); temperature=0 is greedy."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: transcription needs room for at least one text token")
    context = torch.as_tensor(layout.transcript_context(torch.as_tensor(audio).cpu().numpy()))
    return write_text(model, layout, context, max_tokens, text_ok, **kwargs)


def stream_text(model, layout: Layout, context: torch.Tensor, max_tokens: int, text_ok: torch.Tensor | None = None,
                **kwargs) -> Iterator[list[int]]:
    """The text ids the model writes after `context` (which ends with TEXT_START), a few at a time as they are
    sampled (frame_size per step of the loop), up to TEXT_END (not included) or max_tokens; kwargs as transcribe's."""
    grammar = Grammar(layout, model.config.vocab_size, model.lm_head.weight.device, text_ok)
    end, left = layout.special("text_end"), max_tokens
    chunks = sample_frames(model, layout, None, -(-max_tokens // layout.frame_size), context=context,
                           grammar=grammar, **kwargs)
    try:
        for chunk in chunks:
            ids = chunk[0, :left].tolist()
            left -= len(ids)
            if end in ids:
                yield ids[:ids.index(end)]
                return
            yield ids
            if left <= 0:
                return
    finally:
        chunks.close()  # now, not when garbage-collected: a PrefixCache learns what it holds


def write_text(model, layout: Layout, context: torch.Tensor, max_tokens: int, text_ok: torch.Tensor | None = None,
               **kwargs) -> list[int]:
    """stream_text's ids in one list."""
    return [i for ids in stream_text(model, layout, context, max_tokens, text_ok, **kwargs) for i in ids]


def reply(model, layout: Layout, context, max_text: int, n_frames: int, text_ok: torch.Tensor | None = None,
          **kwargs) -> tuple[list[int], torch.Tensor]:
    """A chat reply after Layout.chat_context(turns): its text ids (up to TEXT_END), then the audio it speaks,
    (k * frame_size,) audio ids of the k <= n_frames frames before AUDIO_END. kwargs as transcribe's."""
    context = torch.as_tensor(context, dtype=torch.long).reshape(-1).cpu()
    text = write_text(model, layout, context, max_text, text_ok, **kwargs)
    sp = layout.special_tokens
    spoken = torch.cat([context, torch.tensor([*text, sp["text_end"], sp["audio_start"]], dtype=torch.long)])
    audio = generate_tokens(model, layout, None, n_frames, context=spoken, **kwargs)
    tokens, kept = cut_at_end(audio, layout)
    return text, tokens[0, :int(kept[0]) * layout.frame_size].cpu()


# -----------------------------------------------------------------------------
# decoding while generating

class StreamDecoder:
    """Turns frames into audio as they arrive. A chunk of `chunk_frames` is decoded with CODEC_CONTEXT_FRAMES
    real frames on each side and only its middle is kept, so chunk edges sound (and are) the same as one pass.
    Only the frames a later chunk still needs are kept, so memory stays flat however long the stream.

    A row may end (AUDIO_END at a frame start, then end tokens, as sample_frames gives them): ends[row] is then its
    number of frames, its audio stops there, decoded as the end of a stream (no right context), and is silence
    after it."""

    def __init__(self, tok: AudioTokenizer, chunk_frames: int, context_frames: int = CODEC_CONTEXT_FRAMES,
                 max_frames: int = DECODE_FRAMES):
        self.tok, self.chunk, self.context, self.max_frames = tok, chunk_frames, context_frames, max_frames
        self.frames: list[torch.Tensor] = []  # (B, frame_size) each: frames first, first + 1, ... of the stream
        self.first = 0  # index in the stream of self.frames[0]
        self.done = 0  # frames of the stream already turned into audio
        self.ends: list[int | None] = []  # per row: frames before its AUDIO_END, None while it goes on

    @property
    def n_frames(self) -> int:
        """Frames pushed so far."""
        return self.first + len(self.frames)

    def _codec(self, tokens: torch.Tensor, first: int) -> torch.Tensor:
        """(B, F * frame_size) of frames first, first + 1, ... of the stream -> (B, F * frame_hop). The codec's
        activations grow with rows x frames: a few rows at a time, so peak memory is bounded by max_frames whatever
        the batch size."""
        rows = max(1, self.max_frames // (tokens.shape[1] // self.tok.layout.frame_size))
        return torch.cat([self.tok.decode_codes(self.tok.layout.tokens_to_codes(t), first)
                          for t in tokens.split(rows)])

    def _decode(self, stop: int) -> torch.Tensor:
        """Audio (B, samples) of frames [done, stop), decoded with context on both sides."""
        lo, hi = max(0, self.done - self.context), min(self.n_frames, stop + self.context)
        window = torch.cat(self.frames[lo - self.first:hi - self.first], dim=1)  # (B, (hi - lo) * frame_size)
        tokens, _ = cut_at_end(window, self.tok.layout)
        audio = self._codec(tokens, lo)
        hop, fs = self.tok.frame_hop, self.tok.layout.frame_size
        for row, end in enumerate(self.ends):  # rows that end in this window: decode up to the end only
            if end is not None and end < hi:
                audio[row] = 0.0
                if end > lo:
                    audio[row, :(end - lo) * hop] = self._codec(tokens[row:row + 1, :(end - lo) * fs], lo)[0]
        audio = audio[:, (self.done - lo) * hop:(stop - lo) * hop]
        self.done = stop
        drop = max(0, self.done - self.context) - self.first  # no later chunk reaches back further
        del self.frames[:drop]
        self.first += drop
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
                    self.ends[row] = self.n_frames + int(ended[row].int().argmax())
        self.frames.extend(new)
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
