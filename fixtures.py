"""What tests and bench.py both build: a random SNAC of the real 24 kHz config, synthetic speech-like audio, tiny
models, random datasets, and the no-cache sampling baseline. Offline and seeded; nothing here downloads.

    from fixtures import SNAC_24KHZ_CONFIG, save_random_snac, synth_audio, tiny_gpt
    codec_dir = save_random_snac("/tmp/snac", SNAC_24KHZ_CONFIG)     # load_codec(codec_dir) accepts it
    model = tiny_gpt(layout)                                          # 2 x 64, block 256, eval mode
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import torch

from model import GPT, GPTConfig
from sampling import Grammar, decode_context, frame_ranges, keep_frames, sample_next
from tokenizer import Layout

# the real hubertsiuzdak/snac_24khz config.json; only the weights differ (random, seeded)
SNAC_24KHZ_CONFIG = dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                         decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                         vq_strides=[4, 2, 1], noise=True, depthwise=True)


def save_random_snac(folder: str, config: dict, seed: int = 0) -> str:
    """Write config.json + pytorch_model.bin of a randomly initialised SNAC into folder (as on the Hub)."""
    from snac import SNAC
    torch.manual_seed(seed)
    model = SNAC(**config)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return folder


def synth_audio(seconds: float, sample_rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: a gliding harmonic tone with a syllable-rate envelope, plus a little noise.
    Returns float32 (samples,) or (samples, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.3 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    x = 0.2 * voice * envelope + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (0.8 + 0.2 * c) for c in range(channels)], axis=1)
    return x


def tiny_gpt(vocab_size: int, block_size: int = 64, seed: int = 0, n_embd: int = 32, n_layer: int = 2,
             n_head: int = 2) -> GPT:
    """A randomly initialised GPT (seeded: the same weights for the same arguments), in eval mode, on the CPU in
    float32. Speed does not depend on the weights, so bench.py builds its models here too."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    # GPT-2's init gives near-uniform logits; sharp ones make argmax ties (and so float-noise flips) unlikely
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    return model.eval()


def random_dataset(folder: str, layout: Layout, train_sizes: list[int], val_sizes: list[int], codec: str = "bench",
                   seed: int = 0, dtype: str = "uint16") -> dict:
    """A dataset folder in prepare_audio.py's format (shards + meta.json) of random ids of the layout's vocabulary,
    as uint16 or uint32 shards. Returns meta.json's contents; `codec` is what it names (a codec folder, for
    train.py's eval samples)."""
    os.makedirs(folder, exist_ok=True)
    rng, shards = np.random.default_rng(seed), []
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        for i, n in enumerate(sizes):
            name = f"{split}_{i:03d}.bin"
            rng.integers(0, layout.vocab_size, n).astype("<u2" if dtype == "uint16" else "<u4").tofile(
                os.path.join(folder, name))
            shards.append({"file": name, "split": split, "tokens": n, "sources": []})
    meta = {"codec": codec, "sample_rate": 24000, "frame_hop": 2048, "tokens_per_second": 24000 / 2048 * 7,
            **layout.meta(), "dtype": dtype, "dataset": "random", "shards": shards, "skipped": [], "splits": {}}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


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


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2's, Whisper's) writes bytes as, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


WHISPER_SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")


WHISPER_TINY = dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                    decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536)  # openai/whisper-tiny's
WHISPER_LARGE_V3 = dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                        decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128)


def save_tiny_whisper(folder: str, seed: int = 0, sizes: dict | None = None, max_length: int = 12) -> str:
    """A random-weight Whisper (1 + 1 layers of width 32, or `sizes`: WHISPER_TINY, WHISPER_LARGE_V3) with a
    byte-level tokenizer of 256 symbols and a few merges, saved as the Hub ships one: transformers' ASR pipeline
    loads the folder offline. Random weights never end a transcript: max_length tokens each."""
    import transformers as tf
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    vocab = {s: i for i, s in enumerate(symbols)} | {a + b: 256 + i for i, (a, b) in enumerate(merges)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = tf.WhisperTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              unk_token=WHISPER_SPECIALS[0], bos_token=WHISPER_SPECIALS[0],
                              eos_token=WHISPER_SPECIALS[0])
    tok.add_special_tokens({"additional_special_tokens": list(WHISPER_SPECIALS[1:])})
    ids = {s: tok.convert_tokens_to_ids(s) for s in WHISPER_SPECIALS}
    end = ids["<|endoftext|>"]
    special = dict(decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=end, pad_token_id=end,
                   bos_token_id=end)
    torch.manual_seed(seed)
    sizes = sizes or dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=len(tok), **{"num_mel_bins": 80, **sizes}, max_target_positions=64, **special))
    model.generation_config = tf.GenerationConfig(
        **special, begin_suppress_tokens=[vocab["Ġ"]], max_length=max_length,
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tf.WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(folder)
    return folder


def save_tiny_wavlm_sv(folder: str, seed: int = 0, base: bool = False) -> str:
    """A random-weight WavLM for speaker verification (x-vectors of 16; base=True: WavLM-base-plus-sv's sizes),
    with its feature extractor."""
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.WavLMForXVector(tf.WavLMConfig(xvector_output_dim=512) if base else tf.WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32, 32),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        tdnn_dim=(32, 32, 64), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=16,
        num_buckets=32, max_bucket_distance=100))
    model.save_pretrained(folder)
    tf.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True
                                ).save_pretrained(folder)
    return folder
