"""Continuous batching (batching.py): each stream of a batch gets the tokens it gets alone, rows join and leave."""
import threading

import pytest
import torch

from batching import Busy, Scheduler, Stream, buckets
from conftest import tiny_gpt
from sampling import sample_frames


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models' steps are a few small ops: on a busy 2-core machine a second thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def alone(model, layout, context, n_frames, knobs=(0.0, 0, 1.0), seed=0) -> torch.Tensor:
    """What sample_frames gives one request by itself, as (k, frame_size) frames."""
    gen = torch.Generator().manual_seed(seed)
    frames = sample_frames(model, layout, None, n_frames, temperature=knobs[0], top_k=knobs[1], top_p=knobs[2],
                           generator=gen, context=context, decode="eager")
    return torch.cat(list(frames))


def audio_context(layout, n_prompt_frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.as_tensor(layout.frame_lo).repeat(n_prompt_frames) + torch.randint(
        0, layout.codebook_size, (n_prompt_frames * layout.frame_size,), generator=g)
    return torch.cat([torch.as_tensor(layout.audio_context()), prompt])


def run_all(sched: Scheduler, streams: list[Stream], join_after: list[int]) -> None:
    """Step the scheduler in this thread; stream k is submitted before step join_after[k]."""
    step = 0
    while True:
        for s, at in zip(streams, join_after):
            if at == step:
                sched.submit(s)
        sched.admit()
        if not sched.active and step > max(join_after):
            return
        sched.step()
        step += 1


def collect() -> tuple[list, callable]:
    out: list = []
    return out, out.append


def frames_of(items: list) -> torch.Tensor:
    assert items[-1] is None, items[-1]
    return torch.stack(items[:-1])


def test_batch_rows_equal_each_request_alone_greedy_and_sampled(tok):
    layout = tok.layout
    model = tiny_gpt(layout.vocab_size, block_size=64)  # 9 frames: every stream here slides its window
    requests = [  # (prompt frames, n_frames, knobs, seed, joins before step)
        (0, 14, (0.0, 0, 1.0), 0, 0), (3, 11, (0.0, 0, 1.0), 0, 0), (5, 6, (0.0, 0, 1.0), 0, 2),
        (2, 12, (1.0, 0, 1.0), 5, 1), (1, 9, (0.8, 50, 1.0), 6, 3), (4, 10, (1.2, 0, 0.9), 7, 3),
    ]
    sched = Scheduler(model, layout, max_batch=4, max_queue=8)
    streams, outs = [], []
    for k, (p, n, knobs, seed, _) in enumerate(requests):
        out, emit = collect()
        streams.append(Stream(audio_context(layout, p, k), n, emit, *knobs, seed=seed))
        outs.append(out)
    run_all(sched, streams, [r[4] for r in requests])
    assert sched.active == 0 and all(r is None for r in sched.rows)
    for k, (p, n, knobs, seed, _) in enumerate(requests):
        got = frames_of(outs[k])
        want = alone(model, layout, audio_context(layout, p, k), n, knobs, seed)
        assert got.shape == (n, layout.frame_size) and torch.equal(got, want), (k, got, want)


def test_streams_that_end_leave_and_match_alone(text_tok):
    layout = text_tok.layout
    model = tiny_gpt(layout.vocab_size, block_size=128, seed=3)
    ctx = [torch.as_tensor(layout.speech_context(text_tok.encode_text(t))) for t in ("a cat", "the dog ran", "hi")]
    sched = Scheduler(model, layout, max_batch=2, max_queue=4)
    outs, streams = [], []
    for k, c in enumerate(ctx):
        out, emit = collect()
        outs.append(out)
        streams.append(Stream(c, 40, emit, temperature=1.0, seed=k))
    run_all(sched, streams, [0, 0, 0])
    for k, c in enumerate(ctx):
        got, want = frames_of(outs[k]), alone(model, layout, c, 40, (1.0, 0, 1.0), k)
        assert torch.equal(got, want), k


def test_queue_limit_cancel_and_a_bad_stream(tok):
    layout = tok.layout
    model = tiny_gpt(layout.vocab_size, block_size=64)
    sched = Scheduler(model, layout, max_batch=2, max_queue=1)
    outs = [collect() for _ in range(4)]
    streams = [Stream(audio_context(layout, 0, k), 1000, outs[k][1], seed=k) for k in range(3)]
    for s in streams:
        sched.submit(s)  # two for the free rows, one waits
    with pytest.raises(Busy):
        sched.submit(Stream(audio_context(layout, 0, 9), 5, outs[3][1]))
    sched.admit()
    sched.step()
    assert sched.active == 2 and len(sched.waiting) == 1
    streams[0].cancel()
    sched.step()  # the cancelled row leaves at this frame boundary
    assert sched.rows[0] is None and outs[0][0][-1] is None and len(outs[0][0]) == 2
    sched.admit()  # the waiting stream takes the freed row
    assert sched.rows[0].stream is streams[2] and not sched.waiting
    # a context that does not end on a frame start of an audio segment: an error for that stream only
    bad, emit_bad = collect()
    sched.submit(Stream(torch.cat([torch.as_tensor(layout.audio_context()), torch.tensor([layout.audio_offset])]), 5,
                        emit_bad))
    streams[1].cancel()
    sched.step()
    sched.admit()
    assert isinstance(bad[-1], ValueError) and sched.rows[1] is None
    before = len(outs[2][0])
    sched.step()
    assert len(outs[2][0]) == before + 1  # the others go on


def test_scheduler_thread_jobs_and_stop(tok):
    layout = tok.layout
    model = tiny_gpt(layout.vocab_size, block_size=64)
    sched = Scheduler(model, layout, max_batch=4)
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    done = threading.Event()
    items: list = []

    def emit(x):
        items.append(x)
        if x is None or isinstance(x, Exception):
            done.set()
    sched.submit(Stream(audio_context(layout, 1, 0), 5, emit))
    assert done.wait(30) and items[-1] is None and len(items) == 6
    assert sched.call(lambda: 6 * 7).result(timeout=30) == 42
    with pytest.raises(ZeroDivisionError):
        sched.call(lambda: 1 / 0).result(timeout=30)
    done.clear()
    sched.submit(Stream(audio_context(layout, 1, 0), 10 ** 6, emit))
    sched.stop()
    thread.join(30)
    assert not thread.is_alive() and done.is_set() and isinstance(items[-1], RuntimeError)
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]


def test_a_stream_waits_for_its_consumer_and_still_matches_alone(tok):
    layout = tok.layout
    model = tiny_gpt(layout.vocab_size, block_size=64)
    sched = Scheduler(model, layout, max_batch=2)
    slow_out, slow_emit = collect()
    fast_out, fast_emit = collect()
    slow = Stream(audio_context(layout, 2, 0), 12, slow_emit, temperature=0.0, max_ahead=2)
    fast = Stream(audio_context(layout, 1, 1), 12, fast_emit, temperature=1.0, seed=3)
    sched.submit(slow)
    sched.submit(fast)
    sched.admit()
    for _ in range(4):
        sched.step()
    assert len(slow_out) == 2 and len(fast_out) == 4 and sched.runnable()
    for k in range(100):  # the consumer takes a frame every other step
        if not sched.active:
            break
        slow.took(k % 2)
        sched.step()
        assert slow.frames - slow.taken <= 2
    assert torch.equal(frames_of(slow_out), alone(model, layout, audio_context(layout, 2, 0), 12))
    assert torch.equal(frames_of(fast_out), alone(model, layout, audio_context(layout, 1, 1), 12, (1.0, 0, 1.0), 3))


def test_sample_rows_equals_sample_next_row_by_row():
    from sampling import sample_next, sample_rows
    knobs = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.9, 20, 0.8), (1.0, 600, 1.0)]
    t, k, p = (torch.tensor([[kn[i]] for kn in knobs]) for i in range(3))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits, u = torch.randn(len(knobs), 500, generator=g) * 3, torch.rand(len(knobs), 500, generator=g)
        want = torch.cat([sample_next(logits[i:i + 1], *kn, u[i:i + 1].clone()) for i, kn in enumerate(knobs)])
        assert torch.equal(sample_rows(logits, t, k, p, u.clone()), want)
        greedy_and_plain = [0, 1]  # rows that use neither filter give the same ids without them
        assert torch.equal(sample_rows(logits[greedy_and_plain], t[:2], k[:2], p[:2], u[:2].clone(), filters=False),
                           want[greedy_and_plain])
