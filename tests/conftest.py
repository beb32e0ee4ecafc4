"""Shared offline fixtures: a random-weight SNAC with the real 24 kHz config, saved the way the Hub ships it."""
import json
import os
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
    from codec import load_codec
    return load_codec(codec_dir, device="cpu")


@pytest.fixture(scope="session")
def text_tok(codec_dir):
    """The codec with the text+audio layout of the test encoding."""
    from codec import load_codec
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


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> (folder, preexec_fn): a folder where writing more than `size` bytes fails, for a
    subprocess started with that preexec_fn. A real full disk (a tmpfs of that size) where this runs as root and
    mounting is allowed; elsewhere (CI runners) the file size limit, RLIMIT_FSIZE with SIGXFSZ ignored, so writes
    past it fail with EFBIG instead of killing the process."""
    import shutil
    import subprocess
    resource = pytest.importorskip("resource", reason="no RLIMIT_FSIZE on this platform")
    mounted = []

    def make(size: int):
        folder = str(tmp_path / f"disk{len(mounted)}")
        os.makedirs(folder)
        if os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True).returncode == 0:
            mounted.append(folder)
            return folder, None

        def limit() -> None:
            import signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        mounted.append(None)
        return folder, limit

    yield make
    for folder in filter(None, mounted):
        subprocess.run(["umount", "-l", folder], capture_output=True)
