"""Frame-valid sampling with a KV cache, and decoding tokens to audio while they are generated. No I/O.

    from sampling import generate_tokens, StreamDecoder
    tokens = generate_tokens(model, tok.layout, prompt=None, n_frames=120, num_samples=4)   # (4, 120 * frame_size)
    dec = StreamDecoder(tok, chunk_frames=12)          # push frames as they come, get final audio back

Used by generate.py (and by train.py for eval samples). Errors are ValueError with a message for the user.

Decode steps (`decode=`): "eager" runs the model on the filled cache positions only (dynamic shapes: the fewest
bytes to read, the CPU default); "static" runs a whole frame of static-shape steps (a cache of block_size positions,
attention over the first 1/8, 1/4, 1/2 or all of them with a mask, the sampler and the grammar between them);
"graph" captures that frame once per attention length as a CUDA graph and replays it (the CUDA default); "compile"
compiles the one-token step with inductor (compiled_token_step): on CUDA inside the captured frame, on a CPU as C++
code with the attention length a dynamic size. All give the same tokens for the same seed, up to float rounding
between the kernels.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from codec import AudioTokenizer
from tokenizer import Layout

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


def decode_context(device_type: str) -> contextlib.AbstractContextManager:
    """What every model call of sampling runs under: the attention kernels it may use, and no autocast.

    Never cuDNN attention: on Hopper (H200, torch 2.11) SDPA's default dispatch picks it for the one-token step and
    it builds a new execution plan for every new key length, 48 ms per decode forward against 2.2 (memory-efficient)
    and 2.5 ms (flash). Flash serves the causal prefill, memory-efficient the masked one-token step (flash takes no
    mask), math whatever neither supports. Training keeps the default dispatch: for its fixed shapes cuDNN was the
    fastest (bench.py generate prints both on CUDA).

    Autocast off: sampling runs in the weights' dtype (cast the model for half precision, as generate.py does).
    Under a caller's autocast a static step's new keys would come out in another dtype than its cache's, and a
    captured graph would keep reading autocast's cast copies of the weights, freed when that autocast exits."""
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    if device_type in ("cpu", "cuda", "mps"):  # the device types autocast knows
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


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
    every step (dynamo would recompile per new value at first; in the text+audio layout frame starts get a second
    one, as their id range is longer than 4096).

    On a CPU it runs in the eager loop with attention over the filled positions only, rounded up to 8 (which also
    keeps the length from ever being 1, a size dynamo specialises). At batch 1 a step streams every weight; eager,
    the ~60 small ops between the matrix-vector products (each a dispatch, some an OpenMP region, all on caches the
    weights just flushed) held it to ~50% of the weight-streaming bound on 2 cores. Compiled, they are fused into a
    few C++ loops: 1.5-1.9x eager, 64-90% of the bound on one 2-core VM whose bandwidth drifts (bench.py generate).
    cpp_wrapper: the graph's calls are made from C++, not Python (~1.1x). The compile takes ~20-40 s on 2 cores,
    once per process (inductor's disk cache shortens the next), so eager stays the default there.

    On CUDA StaticStep captures a frame of its steps as one CUDA graph per attention length: the graph removes the
    launches, the compile the kernels (layer norms, residual adds, the sampler fused); the attention length is a
    symbolic size, so one compile serves every captured length.
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


class StaticStep:
    """A whole frame of decode steps with static shapes: its KV cache and its inputs and outputs are tensors
    allocated once, so the frame can be replayed as one CUDA graph. Set `tok` (B, 1), the last token in context,
    `pos` (1,), its position, and `state` (B,), the grammar's; fill `noise` (frame_size, B, width); then
    step(model, pos + frame_size) -> (ids (B, frame_size), the state after them). Frame position p samples among
    the ids ranges[p] = (lo, hi, additive mask over them or None); rows whose audio has ended repeat AUDIO_END.

    mode "static" runs it eagerly; "graph" captures the frame by hand (torch.cuda.CUDAGraph): no compiler, a few
    frames to capture (milliseconds), then one launch per frame. A frame, not a token: between captured one-token
    steps, the sampler's random draws, the grammar and the copies each paid a launch and Python. On an H200 at
    batch 1 the frame graph runs at 0.52 ms per token, 0.475 of them the GPU's own time: the graph's ~15 kernels
    per layer and the sampler's, a few microseconds each. "compile" captures the same frame with inductor's kernels
    in it (compiled_token_step: layer norms, residual adds, the attention's mask and softmax, the sampler fused), one
    graph for every frame position. It replaces torch.compile(mode="reduce-overhead") on the one-token step, which
    an H200 measured at 1,640 tokens/s (graph: 1,938) after a 46 s warm-up: its CUDA graphs hold one token, and each
    frame position was a compile of its own. `python bench.py generate` measures graph against compile on CUDA.
    The model is passed to every call, never kept: a step is cached per model (static_step) and must not keep it
    alive.
    """

    def __init__(self, model, batch_size: int, knobs: tuple[float, int, float], mode: str,
                 ranges: list[tuple[int, int, torch.Tensor | None]], grammar: Grammar):
        device, block_size = model.lm_head.weight.device, model.config.block_size
        self.knobs, self.mode, self.ranges = knobs, mode, ranges
        self.grammar = grammar
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
        # of 8, as new_kv_cache's max_len), with a graph per length: early in a generation a frame reads 256 keys,
        # not 2048. On an H200 the softmax over 2048-key rows was a quarter of a batch-1 token's GPU time
        self.lengths = sorted({-(-max(fs, block_size >> k) // 8) * 8 for k in range(4)})
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # mode "compile": inductor's kernels (compiled_token_step)
        self.fn: Callable = compiled_token_step(device.type) if mode == "compile" else token_step
        self.busy = False  # a generation is using it (another one at the same time gets its own)
        if mode in ("graph", "compile") and device.type == "cuda":
            # the kernels are chosen at capture and replayed as they are; streams and graphs belong to the
            # current device, so make it the model's (cuda:1 works too)
            with decode_context(device.type), torch.cuda.device(device):
                self.graphs = {length: self._capture(model, length) for length in self.lengths}

    def _forward(self, model, tok: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, phase: int,
                 length: int) -> torch.Tensor:
        """One token: tok (B, 1) at position pos -> the next ids (B, 1), sampled among ranges[phase], attending
        over cache positions 0 .. length-1."""
        if self.mode == "compile":
            self.step_noise[:, :noise.size(1)].copy_(noise)
            noise = self.step_noise
        return self.fn(model, tok, self.cache, pos, noise, self.knobs, *self.ranges[phase], length)

    def _frame(self, model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, tok, state, new = self.grammar, self.tok, self.state, []
        for phase in range(len(self.ranges)):
            t = self._forward(model, tok, self.pos + phase, self.noise[phase], phase, length)  # (B, 1)
            if g.can_end:  # a row whose audio has ended repeats AUDIO_END (the level ranges do not hold it)
                t = torch.where(state[:, None] == g.AUDIO_DONE, g.audio_end, t)
                state = g.advance(state, t[:, 0])
            new.append(t)
            tok = t
        return torch.cat(new, dim=1), state

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
        """end: the positions this frame's last step sees, pos + frame_size (pos = tok's position)."""
        length = next(n for n in self.lengths if n >= end)
        if self.graphs:
            with torch.cuda.device(self.out.device):
                self.graphs[length].replay()
            return self.out, self.out_state
        with decode_context(self.out.device.type):
            return self._frame(model, length)


# the static steps of each model, by batch size, sampling knobs and mode: captured (or compiled) once, replayed by
# every later generation; they go when the model goes
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_step(model, batch_size: int, knobs: tuple[float, int, float], mode: str,
                ranges: list[tuple[int, int, torch.Tensor | None]], grammar: Grammar) -> StaticStep:
    """The model's StaticStep for this batch size, knobs, mode, id ranges and grammar: made at the first request,
    then reused (its cache and graph point at the model's weights: a model moved with .to() gets new ones)."""
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
        step = StaticStep(model, batch_size, knobs, mode, ranges, grammar)
        if key not in steps:
            steps[key] = step
        return step
    return steps[key]


@torch.no_grad()
def sample_frames(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, num_samples: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, use_cache: bool = True,
                  context: torch.Tensor | None = None, grammar: Grammar | None = None,
                  decode: str = "auto") -> Iterator[torch.Tensor]:
    """Yield up to n_frames new frames, each (num_samples, frame_size), continuing context + prompt (whole frames).

    context: the tokens before the prompt, default layout.audio_context() ([BOUNDARY], then AUDIO_START in the
    text+audio layout); layout.speech_context(text) makes it speak a text. grammar: which ids may come next
    (default Grammar(layout, ...): audio, ending with AUDIO_END where the layout has one); a text grammar after
    layout.transcript_context(audio) writes text, frame_size tokens per yield. Once every row's segment has ended
    sampling stops early; a row that ended first repeats its end token. use_cache=False recomputes the whole
    window for every token (nanoGPT's generate); same tokens, much slower. decode: how cached steps run (see the
    module docstring); "auto" is "graph" on CUDA and "eager" elsewhere. Memory does not grow with n_frames: the
    window, the cache and the graphs are allocated once.

    Audio is sampled level by level: at each frame position only that level's rows of lm_head are computed (plus,
    at a frame start, AUDIO_END's where the layout has one), which is what the captured steps replay. Text (a
    transcription) is sampled over the whole vocabulary with the grammar's masks, eagerly.
    """
    fs, cs, block_size = layout.frame_size, layout.codebook_size, model.config.block_size
    vocab = model.config.vocab_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
    prompt = prompt.reshape(-1)
    assert len(prompt) % fs == 0, f"prompt of {len(prompt)} tokens is not whole {fs}-token frames"
    if vocab < layout.vocab_size:
        raise ValueError(f"the model knows {vocab} token ids, the tokenizer layout needs "
                         f"{layout.vocab_size}: the checkpoint was trained on another codec")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "eager"
    if decode == "graph" and device.type != "cuda":
        raise ValueError(f"decode={decode!r} captures CUDA graphs: it needs the model on a CUDA device, not {device}")
    if decode == "compile" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"decode={decode!r} compiles for CUDA or a CPU, not {device}: use eager or static")
    context = torch.as_tensor(layout.audio_context() if context is None else context, dtype=torch.long)
    head = torch.cat([context.reshape(-1), prompt.cpu()])  # every training document starts with BOUNDARY
    grammar = grammar or Grammar(layout, vocab, device)
    state = grammar.start(head, num_samples)  # (B,)
    audio = int(state[0]) < fs  # an audio segment, sampled level by level; else text, over the whole vocabulary
    assert not audio or int(state[0]) == 0, "audio sampling starts on a frame start (whole-frame prompts)"
    # the ids each frame position may take, (lo, hi), and the grammar's mask over them (AUDIO_END at a frame start)
    ranges = []
    for phase in range(fs):
        lo = int(layout.frame_lo[phase])
        end = phase == 0 and grammar.audio_end >= 0
        ranges.append((lo, vocab if end else lo + cs, grammar.masks[0, lo:vocab] if end else None))
    # a CPU's compiled audio step runs in the eager loop below (its cache filled by the eager prefill), every frame
    # position with a mask (zeros where the range has none: one graph, not two)
    compiled = None
    if decode == "compile" and device.type == "cpu" and use_cache and audio:
        compiled = compiled_token_step("cpu")
        masks = [torch.zeros(hi - lo, device=device) if m is None else m.clone() for lo, hi, m in ranges]
    keep = keep_frames(layout, block_size) * fs
    # the window the model sees, at most block_size tokens plus the one just sampled; it always starts on a frame
    # start, so its position n holds frame position (n - n0) % fs, n0 being where the prompt's frames start
    ctx = torch.empty(num_samples, block_size + 1, dtype=torch.long, device=device)
    if len(head) > block_size:
        head = head[-keep:]
    n = len(head)
    ctx[:, :n] = head.to(device)
    width = max(hi - lo for lo, hi, _ in ranges) if audio else vocab  # of the sampler's random draws (below)
    step, cache = None, None
    if use_cache and decode != "eager" and compiled is None and audio:
        step = static_step(model, num_samples, (temperature, top_k, top_p), decode, ranges, grammar)
        cache = step.cache
    elif compiled is not None:
        cache, step_tok, step_noise = step_inputs(model, num_samples, width)
    elif use_cache:
        cache = model.new_kv_cache(num_samples)
    # the sampler's random draws, a frame's at once (fs, B, width), made outside the model step in the same order
    # whatever runs it: same seed, same tokens
    noise = step.noise if step is not None else torch.empty(fs, num_samples, width, device=device)
    if step is not None:
        step.busy = True
    try:
        prefill = True
        for _ in range(n_frames):
            if n + fs - 1 > block_size:
                # slide at a frame start: keep the last whole frames that fit, so positions restart at 0 on a frame
                # start, and re-prefill the cache from the kept window (keep_frames leaves room for a whole frame)
                ctx[:, :keep] = ctx[:, n - keep:n].clone()
                n, prefill = keep, True
            if temperature > 0:
                noise.uniform_(generator=generator)
            if step is not None:
                if prefill:  # the cache takes all but the last token in context: the frame step feeds that one
                    cache.reset()
                    if n > 1:
                        with decode_context(device.type):
                            model(ctx[:, :n - 1], kv_cache=cache, vocab_range=(0, 1))  # logits not needed
                    prefill = False
                step.tok.copy_(ctx[:, n - 1:n])
                step.pos.fill_(n - 1)
                step.state.copy_(state)
                frame, state = step(model, n - 1 + fs)
                ctx[:, n:n + fs] = frame
                n += fs
            else:
                with decode_context(device.type):
                    for phase in range(fs):  # the prompt is whole frames: this is the position inside the frame
                        lo, hi, mask = ranges[phase] if audio else (0, vocab, None)
                        if compiled is not None and not prefill:  # position n - 1, attending to n rounded up to 8
                            step_tok.copy_(ctx[:, n - 1:n])
                            step_noise[:, :width].copy_(noise[phase])
                            try:
                                new = compiled(model, step_tok, cache, torch.tensor([n - 1], device=device),
                                               step_noise, (temperature, top_k, top_p), lo, hi, masks[phase],
                                               -(-n // 8) * 8)
                            except torch._dynamo.exc.BackendCompilerFailed as e:
                                raise ValueError(f"decode=compile: torch.compile could not build the decode step "
                                                 f"({str(e).splitlines()[0]}); it needs a working C++ compiler (g++ "
                                                 "or clang, or CXX=<path>); decode=eager needs none") from None
                        else:
                            if cache is None:
                                logits, _ = model(ctx[:, :n], vocab_range=(lo, hi))
                            elif prefill:
                                cache.reset()
                                logits, _ = model(ctx[:, :n], kv_cache=cache, vocab_range=(lo, hi))
                                prefill = False
                            else:
                                logits, _ = model(ctx[:, n - 1:n], kv_cache=cache, vocab_range=(lo, hi))
                            logits = logits[:, -1, :].float()
                            logits = ((logits + mask if mask is not None else logits) if audio
                                      else grammar.mask(logits, state))
                            new = sample_next(logits, temperature, top_k, top_p, noise[phase, :, :hi - lo]) + lo
                        if grammar.can_end:
                            if audio:  # a row whose audio has ended repeats AUDIO_END (not in the level ranges)
                                new = torch.where(state[:, None] == grammar.AUDIO_DONE, grammar.audio_end, new)
                            state = grammar.advance(state, new[:, 0])
                        ctx[:, n:n + 1] = new
                        n += 1
            yield ctx[:, n - fs:n].clone()
            if grammar.can_end and bool(grammar.ended(state).all()):  # one device sync per frame
                return
    finally:  # also when the caller stops early: the step is free for the next generation
        if step is not None:
            step.busy = False


def generate_tokens(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, **kwargs) -> torch.Tensor:
    """Prompt + up to n_frames new frames as one token stream (num_samples, len(prompt) + k * frame_size).
    kwargs are sample_frames' (num_samples, temperature, top_k, top_p, generator, use_cache, context, grammar,
    decode)."""
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
