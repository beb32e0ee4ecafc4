"""Shared offline fixtures: a random-weight SNAC with the real 24 kHz config, saved the way the Hub ships it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# a small tiktoken encoding, "gpt2o_test", registered through tiktoken's plugin namespace (tests/plugins/tiktoken_ext):
# here and, through PYTHONPATH, in every script the tests run
PLUGINS = os.path.join(ROOT, "tests", "plugins")
sys.path.insert(0, PLUGINS)
os.environ["PYTHONPATH"] = os.pathsep.join([PLUGINS, *filter(None, [os.environ.get("PYTHONPATH")])])
TEXT_ENCODING = "gpt2o_test"

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


@pytest.fixture(scope="session")
def codec_dir(tmp_path_factory) -> str:
    """A local codec folder that load_codec() and the scripts' --codec accept."""
    return save_random_snac(str(tmp_path_factory.mktemp("snac_24khz")), SNAC_24KHZ_CONFIG)


@pytest.fixture(scope="session")
def tok(codec_dir):
    """The codec with the audio-only layout."""
    from tokenizer import load_codec
    return load_codec(codec_dir, device="cpu")


@pytest.fixture(scope="session")
def text_tok(codec_dir):
    """The codec with the text+audio layout of the test encoding."""
    from tokenizer import load_codec
    return load_codec(codec_dir, device="cpu", text_encoding=TEXT_ENCODING)


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


# -----------------------------------------------------------------------------
# helpers the test files share

def run_script(script: str, *args: str, env: dict[str, str] | None = None, torchrun: int = 0,
               timeout: float | None = 300, check: bool = False, text: bool = True,
               **kw) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user does: this Python (or its torchrun with that many processes), the repo
    root as cwd, env on top of os.environ, output captured; check: exit 0 or fail showing the script's stderr."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
           f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    r = subprocess.run(cmd + [os.path.join(ROOT, script), *args], capture_output=True, text=text,
                       env={**os.environ, **(env or {})}, cwd=ROOT, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, f"{script} failed:\n{r.stderr}"
    return r


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """A script's user error: exit 1 and one stderr line, "error: ...", naming each of words. Returns that line."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def tiny_gpt(vocab_size: int, block_size: int = 64, seed: int = 0, n_embd: int = 32) -> torch.nn.Module:
    """A 2-layer GPT in eval mode, the same weights for the same seed."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=n_embd))
    # GPT-2's init gives near-uniform logits; sharp ones make argmax ties (and so float-noise flips) unlikely
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    return model.eval()
