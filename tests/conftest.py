"""Shared offline fixtures: a random-weight SNAC with the real 24 kHz config, saved the way the Hub ships it."""
import os
import subprocess
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
from fixtures import SNAC_24KHZ_CONFIG, save_random_snac, synth_audio, tiny_gpt  # noqa: E402, F401


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
