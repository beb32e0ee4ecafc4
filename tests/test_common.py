"""common.py: config files are data (never executed), --key=value conversion and errors, atomic writes, a full
disk and SIGTERM said in one line, the out_dir lock."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from conftest import ROOT

from common import LOCK_NAME, OutDirLock, UserError, atomic_write
from config import parse_config, read_config_file


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
    with pytest.raises(ValueError, match=message):
        parse_config(Cfg, [write(tmp_path, text)])


@pytest.mark.parametrize("arg,message", [
    ("--m=3", "unknown key 'm'"), ("--n=2.5", "not a valid int"), ("--lr=fast", "not a valid float"),
    ("--flag=maybe", "not a valid bool"), ("--lr=nan", "finite"), ("n=3", "expected --key=value"),
])
def test_bad_command_line_names_the_key(arg, message):
    with pytest.raises(ValueError, match=message):
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
    with pytest.raises(ValueError, match="not a text file.*--key=value"):
        parse_config(Cfg, [str(path)])



@pytest.mark.parametrize("text,message", [
    ("n = 9**9**9\n", "exponent"),  # would run for hours at 100% CPU
    ("name = 'a' * 10**11\n", "longer than"),  # would fill memory
    ("n = 1/0\n", "ZeroDivisionError"),
    ("name = 'abc' - 1\n", "TypeError"),
    ("lr = 10.0 ** 400\n", "exponent"),
    ("n = 2**40 * 2**40\n", "out of range"),
    ("name = -'x'\n", "sign only goes before a number"),
])
def test_config_values_are_bounded_and_errors_name_line_and_key(tmp_path, text, message):
    path = write(tmp_path, "flag = True\n" + text)
    key = text.split(" =")[0]
    with pytest.raises(ValueError, match=message) as e:
        parse_config(Cfg, [path])
    assert f"config file {path}, line 2, key {key}:" in str(e.value)


@pytest.mark.parametrize("text", [
    "n = " + "-" * 100_000 + "1\n",  # the parser itself runs out of memory
    "n = " + "+".join(["1"] * 200_000) + "\n",  # ... or of stack
    "n = " + "+".join(["1"] * 2000) + "\n",  # parses, but deeper than a config value needs
    "+".join(["1"] * 2000) + "\n",  # not an assignment: the error quotes the line, not its syntax tree
    "n = 1\n" * 200_000,  # a file of over 1 MB
])
def test_config_syntax_is_bounded(tmp_path, text):
    with pytest.raises(ValueError, match="nested|larger than|expected `key = value`"):
        parse_config(Cfg, [write(tmp_path, text)])


def test_config_helper_names_start_with_an_underscore(tmp_path):
    assert parse_config(Cfg, [write(tmp_path, "_width = 4\nn = _width * 2\n")]) == Cfg(n=8)
    with pytest.raises(ValueError, match="unknown key 'x'.*starts with _, e.g. `_x = ...`"):
        parse_config(Cfg, [write(tmp_path, "x = 1\nn = x\n")])


def test_checkpoint_errors_are_whole_sentences_and_never_advise_an_unsafe_load(tmp_path):
    import collections

    import torch

    from checkpoints import load_checkpoint
    good = str(tmp_path / "good.pt")
    torch.save({"model": {"w": torch.zeros(4096)}, "model_args": {}}, good)
    data = open(good, "rb").read()
    cases = {"garbage.pt": os.urandom(3000), "truncated.pt": data[: len(data) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"model": collections.OrderedDict(), "obj": Cfg()}, tmp_path / "pickled.pt")  # a pickled object
    for name, expect in (("garbage.pt", "damaged"), ("truncated.pt", "damaged"), ("pickled.pt", "safe load refuses")):
        with pytest.raises(ValueError) as e:
            load_checkpoint(str(tmp_path / name))
        message = str(e.value)
        assert name in message and expect in message, message
        assert "weights_only=False" not in message and "weights_only` set to `False" not in message
        assert message.endswith(("best.pt", "weights_only=True)")), message  # not cut mid-sentence


def test_stale_temp_files_of_our_pattern_only(tmp_path):
    from common import remove_stale_temp_files
    for name in ("ckpt.pt.k3j_x9a1.tmp", "best.pt.abc.tmp", "ckpt.pt", "other.bin.x1.tmp", "ckpt.pt.tmp"):
        (tmp_path / name).write_text("x")
    assert remove_stale_temp_files(str(tmp_path), ("ckpt.pt", "best.pt")) == ["best.pt.abc.tmp", "ckpt.pt.k3j_x9a1.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.tmp", "other.bin.x1.tmp"]


def run_script(code: str, preexec=None, until=None) -> subprocess.CompletedProcess:
    """A script that runs `code` as its main() through run_main; SIGTERM once until() is true, when given."""
    script = f"import sys, time\nsys.path.insert(0, {ROOT!r})\nfrom common import *\n\ndef main():\n" + \
        "".join(f"    {line}\n" for line in code.splitlines()) + \
        "\nrun_main(main, on_full_disk='nothing else was touched')\n"
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=preexec)
    if until is not None:
        deadline = time.time() + 60
        while not until() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_full_disk_is_one_line_naming_the_file_and_the_space(small_disk):
    folder, preexec = small_disk(64 * 1024)
    path = os.path.join(folder, "ckpt.pt")
    # torch.save hides the OSError under `RuntimeError: [enforce fail at inline_container.cc]`
    r = run_script(f"import torch\natomic_write({path!r}, lambda f: torch.save(torch.zeros(100_000), f), "
                   "size=400_000)", preexec)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {path}: ") and "nothing else was touched" in lines[0]
    if preexec is None:  # a real full disk
        assert "No space left on device (needs about 400.0 kB, 0 B free)" in lines[0], lines[0]
    else:
        assert "File too large (the file size limit, ulimit -f, is 65.5 kB)" in lines[0], lines[0]
    assert os.listdir(folder) == []  # the temp file is gone
    # libsndfile's only word for it is "System error.": write_failed tells the cause from the disk and the limit
    wav = path[:-3] + ".wav"
    r = run_script(f"import numpy as np, soundfile as sf\ntry:\n    sf.write({wav!r}, np.zeros(100_000), 24000)\n"
                   f"except RuntimeError as e:\n    raise write_failed({wav!r}, e) from None", preexec)
    assert r.stderr.startswith(f"error: {wav}: ") and r.stderr.count("\n") == 1, r.stderr
    assert ("No space left" if preexec is None else "File too large") in r.stderr


def test_sigterm_is_ctrl_c_and_temp_files_are_removed(tmp_path):
    code = (f"def slow(f):\n    f.write(b'x')\n    f.flush()\n    time.sleep(60)\n"
            f"atomic_write({str(tmp_path / 'big.bin')!r}, slow)")
    r = run_script(code, until=lambda: any(n.endswith(".tmp") for n in os.listdir(tmp_path)))
    assert r.returncode == 1 and r.stderr == "error: interrupted\n", (r.returncode, r.stderr)
    assert os.listdir(tmp_path) == []  # no temp file left behind (and no file)


def write_lock(folder, pid: int, host: str | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    from common import _start_time
    with open(os.path.join(folder, LOCK_NAME), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "start": _start_time(pid), "since": time.time(),
                   "script": "train.py"}, f)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_out_dir_lock(tmp_path, capsys):
    out = str(tmp_path / "out")
    with OutDirLock(out):
        assert os.path.isfile(os.path.join(out, LOCK_NAME))
        with pytest.raises(UserError) as e:
            OutDirLock(out).acquire()
        assert f"in use by pytest (process {os.getpid()} on host {socket.gethostname()}, since " in str(e.value) or \
            f"(process {os.getpid()} on host {socket.gethostname()}, since " in str(e.value), str(e.value)
    assert not os.path.exists(out)  # made for the lock, still empty: removed again
    write_lock(out, dead_pid())  # a job killed with -9
    with OutDirLock(out):
        assert "taken over from train.py" in capsys.readouterr().err
    assert os.listdir(out) == []
    write_lock(out, os.getpid(), host="elsewhere")  # another machine's job: cannot tell, so refuse
    with pytest.raises(UserError, match=f"on host elsewhere.*remove {out}/{LOCK_NAME}"):
        OutDirLock(out).acquire()
