"""common.py: config files are data (never executed), --key=value conversion and errors, atomic writes."""
import os
import stat
from dataclasses import dataclass

import pytest

from common import UserError, atomic_write, parse_config, read_config_file


@dataclass
class Cfg:
    name: str = "a"
    n: int = 1
    lr: float = 0.1
    flag: bool = False


def write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return str(path)


def test_config_file_then_command_line(tmp_path):
    path = write(tmp_path, '"""doc"""\nname = "x"\nn = 4 * 8  # arithmetic is fine\nlr = 6e-4\nflag = True\n')
    assert parse_config(Cfg, [path]) == Cfg(name="x", n=32, lr=6e-4, flag=True)
    assert parse_config(Cfg, [path, "--n=1e3", "--lr=1", "--flag=false"]) == Cfg(name="x", n=1000, lr=1.0, flag=False)
    assert parse_config(Cfg, ["--flag"]).flag is True  # a bare boolean flag
    assert read_config_file(write(tmp_path, "a = 2\nb = a * 3\n")) == {"a": 2, "b": 6}
    assert parse_config(Cfg, [write(tmp_path, "n = 5e3\n")]).n == 5000  # as --n=5e3 is
    assert parse_config(Cfg, ["--name=~/data"]).name == os.path.expanduser("~/data")  # the shell leaves ~ after =


@pytest.mark.parametrize("text,message", [
    ("import os\n", "expected `key = value`"),
    ("n = __import__('os').system('echo hacked')\n", "only literals"),
    ("n = open('x')\n", "only literals"),
    ("n = (\n", "not valid Python"),
    ("batch = 3\n", "unknown key 'batch'"),
    ("n = 'three'\n", "n='three' is not a valid int"),
    ("n = 2.5\n", "n=2.5 is not a valid int"),
])
def test_config_file_is_data_not_code(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        parse_config(Cfg, [write(tmp_path, text)])


@pytest.mark.parametrize("arg,message", [
    ("--m=3", "unknown key 'm'"), ("--n=2.5", "not a valid int"), ("--lr=fast", "not a valid float"),
    ("--flag=maybe", "not a valid bool"), ("--lr=nan", "finite"), ("n=3", "expected --key=value"),
])
def test_bad_command_line_names_the_key(arg, message):
    with pytest.raises(UserError, match=message):
        parse_config(Cfg, [arg])


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "out.bin")
    atomic_write(path, lambda f: f.write(b"good"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert open(path, "rb").read() == b"good" and os.listdir(tmp_path) == ["out.bin"]  # no temp file left behind


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_binary_first_argument_is_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"\x80\x02\x00binary")
    with pytest.raises(UserError, match="not a text file.*--key=value"):
        parse_config(Cfg, [str(path)])

