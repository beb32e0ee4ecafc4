"""What tests/ and bench.py share: reference implementations to compare against. Imported by no module."""
from __future__ import annotations

from typing import Iterator

import torch

from sampling import Grammar, decode_context, frame_ranges, keep_frames, sample_next
from tokenizer import Layout


@torch.no_grad()
def nocache_frames(model, layout: Layout, prompt: torch.Tensor | None, n_frames: int, num_samples: int = 1,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, context: torch.Tensor | None = None,
                   grammar: Grammar | None = None) -> Iterator[torch.Tensor]:
    """sample_frames without a KV cache: the whole window through the model for every token, as nanoGPT's generate.
    The same window (sliding by whole frames), grammar and random draws in the same order, so the same tokens for
    the same seed, up to float rounding: the reference the decode steps are tested and timed against."""
    fs, block_size, vocab = layout.frame_size, model.config.block_size, model.config.vocab_size
    device = model.lm_head.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
    context = torch.as_tensor(layout.audio_context() if context is None else context, dtype=torch.long)
    head = torch.cat([context.reshape(-1), prompt.reshape(-1).cpu()])
    grammar = grammar or Grammar(layout, vocab, device)
    state = grammar.start(head, num_samples)  # (B,)
    audio = int(state[0]) < fs  # audio: each frame position's id range; text: the whole vocabulary, masked by state
    ranges = frame_ranges(layout, vocab, grammar) if audio else [(0, vocab, None)] * fs
    keep = keep_frames(layout, block_size) * fs
    x = (head[-keep:] if len(head) + fs - 1 > block_size else head).to(device).expand(num_samples, -1)
    noise = torch.empty(fs, num_samples, max(hi - lo for lo, hi, _ in ranges), device=device)
    for _ in range(n_frames):
        if x.size(1) + fs - 1 > block_size:
            x = x[:, -keep:]  # slide at a frame start, to the last whole frames that fit
        if temperature > 0:
            noise.uniform_(generator=generator)
        with decode_context(device.type):
            for phase in range(fs):
                lo, hi, mask = ranges[phase]
                logits, _ = model(x, vocab_range=(lo, hi))
                logits = logits[:, -1, :].float()
                logits = grammar.mask(logits, state) if not audio else logits if mask is None else logits + mask
                new = sample_next(logits, temperature, top_k, top_p, noise[phase, :, :hi - lo]) + lo
                new, state = grammar.follow(state, new)
                x = torch.cat([x, new], dim=1)
        yield x[:, -fs:]
        if grammar.can_end and bool(grammar.ended(state).all()):
            return
