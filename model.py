"""GPT-2 in one file, as in nanoGPT, plus a KV cache for fast sampling. No I/O, no globals: import it anywhere.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=12289, block_size=2048, n_layer=8, n_head=8, n_embd=512))
    logits, loss = model(idx, targets)                   # training: idx, targets (B, T) int64
    cache = model.new_kv_cache(batch_size=4)             # sampling: prefill once, then one token a step
    logits, _ = model(prompt, kv_cache=cache)            # logits (B, 1, vocab_size) for the last position
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context, in tokens (positions 0 .. block_size-1 have embeddings)
    vocab_size: int = 12289  # ids that exist (SNAC 24 kHz: 3 levels x 4096 codes + 1 boundary token)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on attention weights, residual branches and embeddings; 0 for sampling
    bias: bool = False  # biases in Linear and LayerNorm layers; GPT-2 had them, without is a bit faster

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
    """Keys and values of every layer for the positions seen so far: (n_layer, B, n_head, max_len, head_size)."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far; the next token goes at this position

    def reset(self) -> None:
        self.pos = 0


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

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask, is_causal = None, True
        if kv_cache is not None:
            pos = kv_cache.pos
            kv_cache.k[layer, :, :, pos:pos + T] = k
            kv_cache.v[layer, :, :, pos:pos + T] = v
            k = kv_cache.k[layer, :, :, :pos + T]  # (B, nh, pos+T, hs)
            v = kv_cache.v[layer, :, :, :pos + T]
            if pos > 0:
                # new query i sits at position pos+i and may see every cached key up to and including itself
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        # flash attention where the backend has it; dropout on the attention weights only while training
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
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

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits, loss).

        With targets (B, T): logits (B, T, padded_vocab_size) and the mean cross-entropy; targets of -1 are ignored.
        Without: logits (B, 1, vocab_size) for the last position only (sampling never needs the others, and padded
        ids are cut off so they can never be sampled). With kv_cache, idx continues the cached positions.
        """
        B, T = idx.size()
        pos0 = kv_cache.pos if kv_cache is not None else 0
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of {pos0 + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        logits = self.lm_head(x[:, [-1], :])  # list index keeps the time dim
        return logits[..., :self.config.vocab_size], None

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.n_embd // c.n_head,
                       p.device, dtype or p.dtype)

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
