"""Shared offline fixtures: a random-weight SNAC with the real 24 kHz config, saved the way the Hub ships it."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# a small tiktoken encoding, "gpt2o_test", registered through tiktoken's plugin namespace (tests/plugins/tiktoken_ext):
# here and, through PYTHONPATH, in every script the tests run
PLUGINS = os.path.join(ROOT, "tests", "plugins")
sys.path.insert(0, PLUGINS)
os.environ["PYTHONPATH"] = os.pathsep.join([PLUGINS, *filter(None, [os.environ.get("PYTHONPATH")])])
TEXT_ENCODING = "gpt2o_test"

# now that ROOT is on sys.path: built in fixtures.py, which bench.py shares; tests import them from here
from fixtures import SNAC_24KHZ_CONFIG, save_random_snac, synth_audio  # noqa: E402, F401


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
