"""GPT-2 in one file, as in nanoGPT, plus a KV cache for fast sampling. No I/O, no globals: import it anywhere.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=12289, block_size=2048, n_layer=8, n_head=8, n_embd=512))
    logits, loss = model(idx, targets)                   # training: idx, targets (B, T) int64
    cache = model.new_kv_cache(batch_size=4)             # sampling: allocated once for block_size positions
    logits, _ = model(prompt, kv_cache=cache)            # prefill: logits (B, 1, vocab_size) for the last position
    logits, _ = model(token, kv_cache=cache)             # then one token a step (attends to the filled positions)
    logits, _ = model(token, kv_cache=cache, input_pos=pos)  # or with static shapes, for CUDA graphs (see forward)
    logits, _ = model(token, kv_cache=cache, input_pos=pos, attend=n)  # the same over cache positions 0..n-1 only
    logits, _ = model(tokens, kv_cache=cache, input_pos=pos_bt)  # pos_bt (B, T): each row at its own positions
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F


GELU_FORMS = ("exact", "tanh")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context, in tokens (positions 0 .. block_size-1 have embeddings)
    vocab_size: int = 12289  # ids that exist (SNAC 24 kHz: 3 levels x 4096 codes + 1 boundary token)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on attention weights, residual branches and embeddings; 0 for sampling
    bias: bool = False  # biases in Linear and LayerNorm layers; GPT-2 had them, without is a bit faster
    gelu: str = "exact"  # the MLP's GELU: "exact" (erf), or "tanh", the approximation GPT-2's weights were trained with

    @property
    def padded_vocab_size(self) -> int:
        """The embedding table is padded to a multiple of 64 rows: matmuls with such shapes run faster on GPUs.
        The padded ids are never targets in training and are never returned by forward() when sampling."""
        return (self.vocab_size + 63) // 64 * 64


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1, kept for clarity)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of every layer, allocated once for max_len positions: k[layer], v[layer] are
    (B, n_head, max_len, head_size).

    One tensor per layer, not views of one: torch.compile copies a whole graph input that a step writes into a view
    of, which on a CPU made a compiled step 7x slower than eager. Zeros, not empty memory: the static-shape step
    attends over every position and masks the unwritten ones, and a masked NaN would still poison the sum (0 * NaN).
    `pos` counts the positions filled by the dynamic-shape path.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch_size, n_head, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # positions filled so far; the next token goes at this position

    def reset(self) -> None:
        self.pos = 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """Batch rows start..stop-1 of this cache, as views (what is written there lands here), with pos 0: a
        batched server prefills one row, or steps the first few, through them."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.max_len, view.pos = self.max_len, 0
        return view


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd {config.n_embd} not divisible by n_head {config.n_head}"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, T: int, kv_cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        BT, C = x.size()  # the residual stream is (B * T, C); see GPT.forward
        B = BT // T
        q, k, v = self.c_attn(x).view(B, T, 3 * C).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        is_causal = mask is None
        if input_pos is not None:
            # static shapes: new keys written by index, attention over the mask's L cache positions (all max_len,
            # or the first `attend`), the mask hiding the ones not written yet and the causal future
            L = mask.size(-1)
            if input_pos.dim() == 1:
                k = kv_cache.k[layer].index_copy_(2, input_pos, k)[:, :, :L]  # (B, nh, L, hs)
                v = kv_cache.v[layer].index_copy_(2, input_pos, v)[:, :, :L]
            else:  # (B, T): each row at its own positions
                where = input_pos[:, None, :, None].expand(B, self.n_head, T, C // self.n_head)
                k = kv_cache.k[layer].scatter_(2, where, k)[:, :, :L]
                v = kv_cache.v[layer].scatter_(2, where, v)[:, :, :L]
        elif kv_cache is not None:
            # dynamic shapes: attend to the positions filled so far only (the least memory to read on a CPU)
            pos, cache_k, cache_v = kv_cache.pos, kv_cache.k[layer], kv_cache.v[layer]  # (B, nh, max_len, hs)
            # narrow() rather than [:, :, pos:pos + T]: fewer ops, which shows in a CPU step of a few milliseconds
            cache_k.narrow(2, pos, T).copy_(k)
            cache_v.narrow(2, pos, T).copy_(v)
            k, v = cache_k.narrow(2, 0, pos + T), cache_v.narrow(2, 0, pos + T)  # (B, nh, pos+T, hs)
            if pos > 0:
                # new query i sits at position pos+i and may see every cached key up to and including itself
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        if input_pos is not None:
            # the static step: plain matmuls, not SDPA. The one fused kernel that takes this mask, memory-efficient
            # attention, runs one thread block per (batch, head) for a lone query, each walking all max_len keys;
            # cuBLAS spreads the keys over the chip (docs/benchmarks.md).
            # The scale and the mask are applied in the matmul's epilogue, softmax accumulates in float32
            hs = C // self.n_head
            # one mask for every row (1, 1, T, L), or a row's own (B, 1, T, L) repeated over its heads
            add = mask[0] if mask.size(0) == 1 else mask.expand(B, self.n_head, T, L).reshape(B * self.n_head, T, L)
            att = torch.baddbmm(add, q.reshape(B * self.n_head, T, hs), k.flatten(0, 1).transpose(1, 2),
                                alpha=1.0 / math.sqrt(hs))  # (B * nh, T, L)
            y = torch.bmm(att.softmax(dim=-1), v.flatten(0, 1)).view(B, self.n_head, T, hs)  # (B, nh, T, hs)
        else:
            # flash attention where the backend has it; dropout on the attention weights only while training
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B * T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        assert config.gelu in GELU_FORMS, f"gelu {config.gelu!r}, expected one of {GELU_FORMS}"
        self.gelu = nn.GELU(approximate="none" if config.gelu == "exact" else "tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, T: int, kv_cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), T, kv_cache, layer, input_pos, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size > 0 and config.block_size > 0, f"bad config {config}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding (fewer parameters, better sample efficiency)
        self.transformer.wte.weight = self.lm_head.weight
        # activation checkpointing: in training, keep only each Block's input and recompute the rest in backward
        self.checkpoint_blocks = False
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), since each block adds two of them to the stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "GPT":
        """The model of a checkpoint dict as train.py writes it ({"model_args": ..., "model": state_dict}); no I/O."""
        model = cls(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embeddings are left out by default (the token embeddings are tied to
        lm_head, so they are the output layer's weights and are counted)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, attend: int | None = None,
                vocab_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits, loss).

        With targets (B, T): logits (B, T, padded_vocab_size), -inf at the padded ids, and the mean cross-entropy;
        targets of -1 are ignored.
        Without: logits (B, 1, vocab_size) for the last position only (sampling never needs the others, and padded
        ids are cut off so they can never be sampled); vocab_range=(lo, hi) computes the logits of ids lo..hi-1 only
        (B, 1, hi - lo): a sampler that may only pick among them reads a third of lm_head instead of all of it.
        With kv_cache, idx continues the kv_cache.pos positions filled so far, and attention reads just those.
        With kv_cache and input_pos, a (T,) tensor of positions on idx's device, idx is written at those positions
        and attention runs over the whole cache with a mask: every shape and every kernel is the same at any
        position, so one step can be captured as a CUDA graph and replayed (kv_cache.pos is left alone); a (B, T)
        input_pos puts each row at its own positions (rows of a batch that joined at different times). attend=L
        (>= the last position + 1) reads only the first L cache positions instead: on a CPU, where each byte read
        counts, with L a dynamic size of one compiled step; on CUDA, a graph captured per L.
        """
        B, T = idx.size()
        mask = None
        if input_pos is not None:
            assert kv_cache is not None and input_pos.shape in ((T,), (B, T)), f"input_pos {tuple(input_pos.shape)}"
            pos = input_pos
            # additive mask (1, 1, T, L), or (B, 1, T, L) per row: query at position p sees the cached positions 0..p
            L = attend or kv_cache.max_len
            seen = torch.arange(L, device=idx.device) <= input_pos[..., None]  # (T, L) or (B, T, L)
            mask = torch.zeros(seen.shape, device=idx.device, dtype=kv_cache.k[0].dtype).masked_fill(~seen, -math.inf)
            mask = mask[None, None] if input_pos.dim() == 1 else mask[:, None]
        else:
            pos0 = kv_cache.pos if kv_cache is not None else 0
            if pos0 + T > self.config.block_size:
                raise ValueError(f"sequence of {pos0 + T} tokens is longer than block_size {self.config.block_size}")
            pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, n_embd)
        # the residual stream is 2-D, (B * T, n_embd): every Linear gets a plain matrix. A compiled one-token step's
        # (1, 1, C) activations viewed as (1, C) would get stride 0 on the size-1 dim, which ATen's matmul copies first
        x = x.view(B * T, -1)
        for i, block in enumerate(self.transformer.h):
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                # the recomputation replays the same dropout masks (the RNG state is saved with the input)
                x = torch.utils.checkpoint.checkpoint(block, x, T, use_reentrant=False)
            else:
                x = block(x, T, kv_cache, i, input_pos, mask)
        x = self.transformer.ln_f(x)
        if kv_cache is not None and input_pos is None:
            kv_cache.pos += T
        if targets is not None:
            logits = self.lm_head(x).view(B, T, -1)
            # the loss is over the real vocabulary: padded ids get no probability (and their rows no gradient)
            logits[..., self.config.vocab_size:].fill_(-math.inf)
            # the mean over the targets that count (-1: ignored, as inside a user turn); a window with none adds 0,
            # not NaN, and nothing waits on the device to find out
            t = targets.reshape(-1)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), t, ignore_index=-1, reduction="sum") / \
                (t >= 0).sum().clamp(min=1)
            return logits, loss
        lo, hi = vocab_range or (0, self.config.vocab_size)
        assert 0 <= lo < hi <= self.config.vocab_size, f"vocab_range {vocab_range}, vocab_size {self.config.vocab_size}"
        # rows lo..hi-1 of the tied weight are a contiguous view (no copy)
        # (B, n_embd), the last position; a one-token step passes x itself: a (B, 1, C) view's slice is the
        # zero-stride matrix that ATen copies (above)
        x = x if T == 1 else x.view(B, T, -1)[:, -1, :]
        return F.linear(x, self.lm_head.weight[lo:hi]).view(B, 1, -1), None

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        # a multiple of 8 positions keeps the static step's mask rows 16-byte aligned, as CUDA attention kernels
        # want (the positions past block_size are never written and always masked)
        max_len = -(-(max_len or c.block_size) // 8) * 8
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, p.device, dtype or p.dtype)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        optim_groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused CUDA kernel does the whole update in one launch
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N plus the attention matmuls."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (both in FLOP/s)."""
        return self.flops_per_token(seq_len or self.config.block_size) * tokens_per_second / peak_flops
