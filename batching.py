"""Continuous batching: many audio streams share one model's decode steps. No I/O.

    sched = Scheduler(model, tok.layout, max_batch=8, max_queue=16)
    threading.Thread(target=sched.run, daemon=True).start()       # one thread owns the model
    stream = Stream(context, n_frames=120, temperature=1.0, seed=7, emit=frames.put)
    sched.submit(stream)                     # raises Busy when max_queue streams already wait
    frame = frames.get()                     # (frame_size,) ids, ..., then None (or the exception that ended it)
    stream.cancel()                          # its row is free at the next frame boundary
    text = sched.call(lambda: transcribe(...)).result()   # any other model work, run between two frames

One KV cache of max_batch rows; each row holds one stream at its own positions (the model's per-row input_pos).
A frame step runs the first b rows together, b the smallest bucket (1, 2, 4, ... max_batch) that holds every busy
row; on CUDA each (bucket, attention length) frame is a CUDA graph captured once at start (warm_up), so a stream
joining never waits for a capture. A new stream is prefilled alone into a free row and joins at the next frame
boundary; a finished or cancelled one leaves and frees its row. Each row samples with its own knobs (sample_rows)
and its own generator, drawing its noise as sample_frames alone does, so a stream's tokens are what the same
request gets from sample_frames with the same seed, up to float rounding between batch sizes.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Callable

import torch

from sampling import Grammar, decode_context, frame_ranges, keep_frames, sample_rows
from tokenizer import Layout


class Busy(Exception):
    """The queue of waiting streams is full: try again later."""


class Stream:
    """One request: continue `context` (1-D ids ending inside an audio segment on a frame start) by up to n_frames
    frames. emit(frame) gets each new frame, (frame_size,) int64 on the CPU, then None at the end, or the exception
    that stopped it; it is called from the scheduler's thread and must not block."""

    def __init__(self, context: torch.Tensor, n_frames: int, emit: Callable[[object], None],
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_ahead: int = 0):
        """max_ahead: frames emitted and not yet taken (took()) after which the stream waits for its consumer,
        so a row is held as long as its listener listens; 0 = never wait."""
        if n_frames < 1:
            raise ValueError(f"n_frames={n_frames}: a stream needs at least one frame")
        self.context = torch.as_tensor(context, dtype=torch.long).reshape(-1).cpu()
        self.n_frames, self.emit, self.max_ahead = n_frames, emit, max_ahead
        self.knobs, self.seed = (temperature, top_k, top_p), seed
        self.cancelled = False
        self.frames = 0  # frames emitted so far
        self.taken = 0  # frames the consumer has taken
        self.wake: threading.Condition | None = None  # the scheduler's, set by submit()

    @property
    def waiting(self) -> bool:
        """Whether it is too far ahead of its consumer to be given another frame now."""
        return self.max_ahead > 0 and self.frames - self.taken >= self.max_ahead

    def took(self, n: int) -> None:
        """The consumer has taken n more frames."""
        self.taken += n
        self._notify()

    def cancel(self) -> None:
        """Stop at the next frame boundary (a client that went away)."""
        self.cancelled = True
        self._notify()

    def _notify(self) -> None:
        if self.wake is not None:
            with self.wake:
                self.wake.notify()


class Row:
    """A stream in a row of the batch: its window (the last ids the model sees), its grammar state, its generator."""

    def __init__(self, stream: Stream, window: torch.Tensor, state: int, generator: torch.Generator | None):
        self.stream, self.window, self.state, self.generator = stream, window, state, generator


def emit(stream: Stream, item: object) -> None:
    """Hand a stream its next item; a consumer that is gone (its event loop closed) only cancels its own stream."""
    try:
        stream.emit(item)
    except Exception:
        stream.cancel()


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a frame step runs at: 1, 2, 4, ... and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class Scheduler:
    """Runs every admitted stream one frame per step in one batch; see the module docstring."""

    def __init__(self, model, layout: Layout, max_batch: int = 8, max_queue: int = 16, graphs: bool | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}: need max_batch >= 1, max_queue >= 0")
        self.model, self.layout = model, layout
        self.max_batch, self.max_queue = max_batch, max_queue
        fs, block_size, vocab = layout.frame_size, model.config.block_size, model.config.vocab_size
        if vocab < layout.vocab_size:
            raise ValueError(f"the model knows {vocab} token ids, the tokenizer layout needs {layout.vocab_size}")
        self.device = device = model.lm_head.weight.device
        self.grammar = Grammar(layout, vocab, device)
        self.ranges = frame_ranges(layout, vocab, self.grammar)
        self.width = max(hi - lo for lo, hi, _ in self.ranges)
        self.keep = keep_frames(layout, block_size) * fs
        self.graphs_on = device.type == "cuda" if graphs is None else graphs
        M = max_batch
        self.cache = model.new_kv_cache(M, max_len=block_size + 8)
        self.views = {b: self.cache.rows(0, b) for b in buckets(M)}
        # the frame step's inputs and outputs, allocated once (a captured graph reads and writes these very tensors)
        self.tok = torch.zeros(M, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(M, 1, dtype=torch.long, device=device)
        self.state = torch.zeros(M, dtype=torch.long, device=device)
        self.noise = torch.ones(fs, M, self.width, device=device)
        self.temperature = torch.zeros(M, 1, device=device)
        self.top_k = torch.zeros(M, 1, dtype=torch.long, device=device)
        self.top_p = torch.ones(M, 1, device=device)
        self.out = torch.zeros(M, fs, dtype=torch.long, device=device)
        self.out_state = torch.zeros(M, dtype=torch.long, device=device)
        # attention lengths, as StaticStep's (multiples of 8): a graph per (bucket, length)
        self.lengths = sorted({-(-max(fs, block_size >> k) // 8) * 8 for k in range(4)})
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.rows: list[Row | None] = [None] * M
        self.waiting: collections.deque[Stream] = collections.deque()
        self.jobs: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0  # frame steps run so far

    # -- what other threads call ------------------------------------------------------------------------------------

    def submit(self, stream: Stream) -> None:
        """Queue a stream; it joins the batch when a row is free. Busy when max_queue streams wait already."""
        with self.wake:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_queue + sum(r is None for r in self.rows):
                raise Busy(f"{len(self.waiting)} requests are waiting for one of {self.max_batch} rows")
            stream.wake = self.wake
            self.waiting.append(stream)
            self.wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() in the scheduler's thread between two frames (it owns the model); its result in the Future."""
        future: Future = Future()
        with self.wake:
            self.jobs.append((fn, future))
            self.wake.notify()
        return future

    def stop(self) -> None:
        """End run() after the current step; every stream still waiting or running gets an error."""
        with self.wake:
            self.stopping = True
            self.wake.notify()

    @property
    def active(self) -> int:
        """Streams in the batch now."""
        return sum(r is not None for r in self.rows)

    def runnable(self) -> bool:
        """Whether a step has work: a row that may take a frame, or one to let go."""
        return any(r is not None and (r.stream.cancelled or not r.stream.waiting) for r in self.rows)

    # -- the loop ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self) -> None:
        """The scheduler's loop: run queued jobs, admit waiting streams into free rows, step the batch."""
        while True:
            with self.wake:
                while not (self.stopping or self.jobs or (self.waiting and None in self.rows) or self.runnable()):
                    self.wake.wait()
                if self.stopping:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller's error, not the scheduler's
                        future.set_exception(e)
            try:
                self.admit()
                if self.active:
                    self.step()
            except Exception as e:  # a failed step (out of memory, say) ends the streams in it, not the server
                for i, row in enumerate(self.rows):
                    if row is not None:
                        self.leave(i, e)
        self.shutdown()

    def shutdown(self) -> None:
        err = RuntimeError("the server stopped before this stream ended")
        with self.wake:
            streams = list(self.waiting) + [r.stream for r in self.rows if r is not None]
            self.waiting.clear()
            self.rows = [None] * self.max_batch
            jobs = list(self.jobs)
            self.jobs.clear()
        for s in streams:
            emit(s, err)
        for _, future in jobs:
            future.cancel()

    @torch.no_grad()
    def admit(self) -> None:
        """Prefill waiting streams into free rows (the lowest first, so the batch stays in a small bucket)."""
        while True:
            with self.wake:
                free = [i for i, r in enumerate(self.rows) if r is None]
                if not free or not self.waiting:
                    return
                stream = self.waiting.popleft()
            if stream.cancelled:
                emit(stream, None)
                continue
            try:
                self.rows[free[0]] = self.join(free[0], stream)
            except Exception as e:  # a bad context: that stream's error, never the batch's
                emit(stream, e)

    def join(self, i: int, stream: Stream) -> Row:
        fs, block_size = self.layout.frame_size, self.model.config.block_size
        head = stream.context
        state = int(self.grammar.start(head, 1)[0])
        if state != 0:
            raise ValueError("a stream's context must end on a frame start inside an audio segment")
        window = head[-self.keep:] if len(head) + fs - 1 > block_size else head
        temperature, top_k, top_p = stream.knobs
        generator = torch.Generator(device=self.device).manual_seed(stream.seed) if temperature > 0 else None
        self.temperature[i], self.top_k[i], self.top_p[i] = temperature, top_k, top_p
        self.prefill(i, window)
        return Row(stream, window, state, generator)

    def prefill(self, i: int, window: torch.Tensor) -> None:
        """Row i's cache from the window but its last id (the frame step feeds that one), as StaticStep does."""
        if len(window) > 1:
            with decode_context(self.device.type):
                self.model(window[None, :-1].to(self.device), kv_cache=self.cache.rows(i, i + 1), vocab_range=(0, 1))

    def leave(self, i: int, last: object = None) -> None:
        row, self.rows[i] = self.rows[i], None
        emit(row.stream, last)

    @torch.no_grad()
    def step(self) -> None:
        """One frame for every row in the batch."""
        fs, block_size = self.layout.frame_size, self.model.config.block_size
        for i, row in enumerate(self.rows):
            if row is not None and row.stream.cancelled:
                self.leave(i)
        held = [i for i, r in enumerate(self.rows) if r is not None]
        busy = [i for i in held if not self.rows[i].stream.waiting]
        if not busy:
            return
        b = next(n for n in buckets(self.max_batch) if n > max(held))
        tok, pos, state = torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, 1, dtype=torch.long), [0] * b
        for i in held:
            # a row waiting for its consumer is stepped too (the bucket's shape) and its frame dropped: it redoes its
            # last frame start, which rewrites what its cache holds there; at the end of its window it will slide
            # and re-prefill, so position 0 is as good
            row = self.rows[i]
            at = len(row.window) - 1 if len(row.window) + fs - 1 <= block_size else 0
            tok[i, 0], pos[i, 0], state[i] = row.window[at], at, row.state
        for i in busy:
            row = self.rows[i]
            if len(row.window) + fs - 1 > block_size:  # slide at a frame start, as sample_frames does
                row.window = row.window[-self.keep:]
                self.prefill(i, row.window)
            if row.generator is not None:  # the draws sample_frames makes alone: (frame_size, 1, width) per frame
                self.noise[:, i].copy_(torch.empty(fs, 1, self.width, device=self.device)
                                       .uniform_(generator=row.generator)[:, 0])
            tok[i, 0], pos[i, 0], state[i] = row.window[-1], len(row.window) - 1, row.state
        self.tok[:b].copy_(tok)
        self.pos[:b].copy_(pos)
        self.state[:b].copy_(torch.tensor(state))
        end = max(len(self.rows[i].window) for i in busy) - 1 + fs  # positions the last step of the frame sees
        length = next(n for n in self.lengths if n >= end) if self.graphs_on else -(-end // 8) * 8
        filters = self.graphs_on or any(self.rows[i].stream.knobs[1] > 0 or self.rows[i].stream.knobs[2] < 1
                                        for i in busy)
        if (b, length) in self.graphs:
            self.graphs[b, length].replay()
            frames, states = self.out[:b], self.out_state[:b]
        else:
            frames, states = self.frame(b, length, filters)
        frames, states = frames.cpu(), states.cpu()  # one copy to the host per frame
        self.steps += 1
        for i in busy:
            row = self.rows[i]
            row.window = torch.cat([row.window, frames[i]])
            row.state = int(states[i])
            row.stream.frames += 1
            emit(row.stream, frames[i])
            if row.stream.frames >= row.stream.n_frames or row.state > self.grammar.TEXT:  # AUDIO_END: it ended
                self.leave(i)

    def frame(self, b: int, length: int, filters: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The first b rows' next frame (b, frame_size) and grammar states (b,), attending over `length` positions:
        StaticStep's frame with a position, knobs and draws per row."""
        tok, state, new = self.tok[:b], self.state[:b], []
        knobs = self.temperature[:b], self.top_k[:b], self.top_p[:b]
        with decode_context(self.device.type):
            for phase, (lo, hi, mask) in enumerate(self.ranges):
                logits, _ = self.model(tok, kv_cache=self.views[b], input_pos=self.pos[:b] + phase, attend=length,
                                       vocab_range=(lo, hi))
                logits = logits[:, -1, :].float()
                new_ids = sample_rows(logits if mask is None else logits + mask, *knobs,
                                      self.noise[phase, :b, :hi - lo], filters) + lo
                tok, state = self.grammar.follow(state, new_ids)
                new.append(tok)
        return torch.cat(new, dim=1), state

    @torch.no_grad()
    def warm_up(self) -> None:
        """Capture a CUDA graph per (bucket, attention length) now (off CUDA: run one frame per bucket), so that no
        request pays for it. Row states are left as they were (the captures write only rows no stream holds)."""
        assert self.active == 0, "warm_up runs before any stream joins"
        if not self.graphs_on:
            self.frame(1, self.lengths[0])
            return
        pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
        with torch.cuda.device(self.device):
            for b in buckets(self.max_batch):
                for length in self.lengths:
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(2):  # cuBLAS handles and workspaces are made outside the capture
                            self.frame(b, length)
                    torch.cuda.current_stream().wait_stream(s)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=s, capture_error_mode="thread_local"):
                        frames, states = self.frame(b, length)
                        self.out[:b].copy_(frames)
                        self.out_state[:b].copy_(states)
                    self.graphs[b, length] = graph
            torch.cuda.synchronize(self.device)
