"""model.py: learning, the KV cache, the padded vocab, init and checkpoints."""
import math

import pytest
import torch

from checkpoints import load_checkpoint, save_checkpoint
from model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and much slower with two when other tests load the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
    return GPT(GPTConfig(**{**args, **kw}))


def test_overfits_a_repeating_stream():
    model = tiny()
    pattern = torch.tensor([3, 17, 42, 5, 9, 0, 33, 49])
    stream = pattern.repeat(40)  # (320,)
    optimizer = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    for step in range(150):
        starts = torch.randint(0, len(stream) - 17, (8,))
        x = torch.stack([stream[s:s + 16] for s in starts])  # (8, 16)
        y = torch.stack([stream[s + 1:s + 17] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()


@pytest.mark.parametrize("bias", [False, True])
def test_kv_cache_matches_full_forward(bias: bool):
    """The prefill, one-token steps (with and without vocab_range) and later chunks all give the logits of one full
    forward; a cache already holding block_size positions refuses one more token."""
    model = tiny(bias=bias).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full, _ = model(idx, torch.zeros_like(idx))  # (B, T, padded_vocab): logits at every position
        full = full[..., :50]
        cache = model.new_kv_cache(2)
        logits, _ = model(idx[:, :8], kv_cache=cache)  # prefill
        torch.testing.assert_close(logits[:, 0], full[:, 7], atol=1e-5, rtol=1e-5)
        for t in range(8, 20):  # then one token at a time
            logits, _ = model(idx[:, t:t + 1], kv_cache=cache, vocab_range=(10, 30) if t % 2 else None)
            torch.testing.assert_close(logits[:, 0], full[:, t, 10:30] if t % 2 else full[:, t], atol=1e-5, rtol=1e-5)
        assert cache.pos == 20
        cache.reset()
        for t in range(32):  # a one-token step from the empty cache on, up to block_size, and one past it
            model(idx[:, t % 20:t % 20 + 1], kv_cache=cache)
        with pytest.raises(ValueError, match="33 tokens is longer than block_size 32"):
            model(idx[:, :1], kv_cache=cache)
        cache.reset()  # chunks after the first need the offset causal mask
        for a, b in ((0, 5), (5, 12), (12, 20)):
            logits, _ = model(idx[:, a:b], kv_cache=cache)
            torch.testing.assert_close(logits[:, 0], full[:, b - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attend", [False, True])
def test_static_step_matches_full_forward(attend: bool):
    """The static-shape step (index writes, attention over the whole cache, or its first `attend` positions, with a
    mask) gives the logits of a full forward, position after position, after a dynamic prefill; it leaves
    kv_cache.pos alone."""
    model = tiny(bias=True).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full, _ = model(idx, torch.zeros_like(idx))  # (B, T, padded_vocab)
        cache = model.new_kv_cache(2)
        assert len(cache.k) == 2 and cache.k[0].shape == (2, 2, 32, 16)  # per layer (B, nh, max_len, hs), once
        for k, v in zip(cache.k, cache.v):  # stale values past the filled positions (an earlier window's) are masked
            k.fill_(1e4)
            v.fill_(-1e4)
        model(idx[:, :8], kv_cache=cache)
        for t in range(8, 20):
            pos = torch.tensor([t])
            # attend: the filled positions rounded up to 8, as the compiled CPU step reads them
            logits, _ = model(idx[:, t:t + 1], kv_cache=cache, input_pos=pos, attend=-(-(t + 1) // 8) * 8 if attend
                              else None)
            torch.testing.assert_close(logits[:, 0], full[:, t, :50], atol=1e-5, rtol=1e-5)
        assert cache.pos == 8
        # several positions at once (a static prefill) and a slice of the vocabulary
        logits, _ = model(idx[:, 12:16], kv_cache=cache, input_pos=torch.arange(12, 16), vocab_range=(10, 30))
        torch.testing.assert_close(logits[:, 0], full[:, 15, 10:30], atol=1e-5, rtol=1e-5)


def test_vocab_range_is_a_slice_of_the_logits():
    model = tiny().eval()
    idx = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        whole, _ = model(idx)
        part, _ = model(idx, vocab_range=(7, 19))
    assert part.shape == (3, 1, 12)
    torch.testing.assert_close(part, whole[..., 7:19], atol=1e-6, rtol=0)
    with pytest.raises(AssertionError, match="vocab_range"):
        model(idx, vocab_range=(0, 51))  # past vocab_size: padded ids could be sampled


def test_padded_vocab_is_never_returned():
    model = tiny(vocab_size=70)
    assert model.config.padded_vocab_size == 128 and model.lm_head.weight.shape[0] == 128
    with torch.no_grad():
        model.lm_head.weight[70:] = 100.0  # padded rows that would win every argmax if they leaked out
        logits, loss = model(torch.randint(0, 70, (3, 10)))
    assert logits.shape == (3, 1, 70) and loss is None
    assert logits.max() < 50


def test_init_and_parameter_count():
    model = tiny(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, block_size=64)
    c = model.config
    assert model.transformer.wte.weight is model.lm_head.weight  # tied
    per_block = 12 * c.n_embd ** 2 + 2 * c.n_embd  # attn 4C^2 + mlp 8C^2 + two LayerNorm gains
    expected = c.padded_vocab_size * c.n_embd + c.n_layer * per_block + c.n_embd
    assert model.get_num_params() == expected
    assert model.get_num_params(non_embedding=False) == expected + c.block_size * c.n_embd
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * c.n_layer)) < 0.001, std
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.get_num_params(False)


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = tiny().eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_args": vars(model.config), "meta": {"layout": "x"}})
    ckpt = load_checkpoint(path)  # torch.load(weights_only=True) inside
    loaded = GPT.from_checkpoint(ckpt).eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)
    assert loaded.transformer.wte.weight is loaded.lm_head.weight
