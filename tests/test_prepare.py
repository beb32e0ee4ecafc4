"""prepare_audio.py end to end, as a user runs it: a folder of real audio files in several formats, rates and
channel counts plus broken ones -> shards + meta.json; resume after a kill, --strict, errors, and torchrun."""
import filecmp
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, run_script, synth_audio
from tokenizer import Layout

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# the usable files: name -> (seconds, rate, channels, soundfile format); sorted order puts a_ first (the val file)
GOOD = {"a_mono24k.wav": (1.0, 24000, 1, "WAV"), "b_stereo44k.flac": (0.8, 44100, 2, "FLAC"),
        "sub/c_mono16k.ogg": (0.6, 16000, 1, "OGG")}
if "MP3" in sf.available_formats():
    GOOD["sub/d_mono22k.mp3"] = (0.5, 22050, 1, "MP3")
BAD = ["corrupt.flac", "empty.wav", "short.wav", "truncated.wav"]


def run_prepare(*args: str, torchrun: bool = False, env: dict[str, str] = ENV, timeout: float | None = None,
                **kw) -> subprocess.CompletedProcess:
    """prepare_audio.py in one process, or in two under torchrun."""
    return run_script("prepare_audio.py", *args, torchrun=2 if torchrun else 0, env=env, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    (d / "sub").mkdir()
    for i, (name, (seconds, rate, channels, fmt)) in enumerate(GOOD.items()):
        sf.write(d / name, synth_audio(seconds, rate, channels, seed=i), rate, format=fmt)
    (d / "corrupt.flac").write_bytes(b"fLaC" + np.random.default_rng(0).bytes(3000))
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "short.wav", synth_audio(0.05, 24000), 24000)  # 1200 samples < one 2048-sample frame
    sf.write(d / "full.tmpwav", synth_audio(0.5, 48000, 2), 48000, format="WAV")
    data = (d / "full.tmpwav").read_bytes()
    (d / "truncated.wav").write_bytes(data[: len(data) // 2])  # a download cut off half way
    (d / "full.tmpwav").unlink()
    (d / "notes.txt").write_text("not audio, not looked at")
    return str(d)


@pytest.fixture(scope="module")
def prepared(audio_dir, codec_dir, tmp_path_factory):
    """One uninterrupted single-process run: the reference every other run is compared with, byte for byte."""
    out = str(tmp_path_factory.mktemp("prepared"))
    args = [f"--codec={codec_dir}", f"--dataset={audio_dir}", f"--out_dir={out}", "--device=cpu", "--shard_tokens=100",
            "--text_encoding=none"]  # the audio-only layout; tests/test_text.py prepares the text+audio one
    r = run_prepare(*args)
    assert r.returncode == 0, r.stderr
    return out, args, r


def final_files(out):
    return sorted(f for f in os.listdir(out) if not f.startswith("."))


def assert_same_output(a, b):
    assert final_files(a) == final_files(b)
    for name in final_files(a):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


def test_meta_shards_and_token_counts(prepared, audio_dir, tok):
    out, _, r = prepared
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert {k: meta[k] for k in tok.meta()} == tok.meta()
    assert meta["dtype"] == "uint16" and meta["dataset"] == audio_dir
    layout = Layout.from_meta(meta)
    # every usable file: one document of [BOUNDARY] + ceil(duration / frame) * 7 tokens, in sorted order
    names = sorted(GOOD)
    expected = {}
    for name in names:
        info = sf.info(os.path.join(audio_dir, name))
        expected[name] = 1 + -(-info.frames * 24000 // (info.samplerate * 2048)) * 7
    assert {s["file"] for s in meta["skipped"]} == set(BAD)
    for split, docs in (("val", names[:1]), ("train", names[1:])):
        shards = [s for s in meta["shards"] if s["split"] == split]
        assert [s["file"] for s in shards] == [f"{split}_{i:03d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 100 for s in shards[:-1])  # cut at shard_tokens
        stream = np.concatenate([np.fromfile(os.path.join(out, s["file"]), dtype="<u2") for s in shards])
        assert [os.path.getsize(os.path.join(out, s["file"])) for s in shards] == [2 * s["tokens"] for s in shards]
        assert len(stream) == sum(expected[n] for n in docs) == meta["splits"][split]["tokens"]
        assert meta["splits"][split]["files"] == len(docs)
        starts = np.cumsum([0] + [expected[n] for n in docs[:-1]])
        assert np.flatnonzero(stream == layout.boundary_id).tolist() == starts.tolist()
        for start, name in zip(starts, docs):
            layout.tokens_to_codes(stream[start + 1:start + expected[name]].astype(np.int64))  # right level everywhere
        assert sorted({src for s in shards for src in s["sources"]}) == sorted(docs)
    assert meta["splits"]["val"]["seconds"] == pytest.approx(GOOD[names[0]][0], abs=1e-3)
    # the content is the tokenizer's own encoding of the file
    audio, rate = sf.read(os.path.join(audio_dir, names[0]), dtype="float32")
    val = np.fromfile(os.path.join(out, "val_000.bin"), dtype="<u2")
    assert np.array_equal(val[1:expected[names[0]]], tok.encode(audio, rate))
    # one warning line per skipped file, naming it and the reason
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == len(BAD)
    reasons = {s["file"]: s["reason"] for s in meta["skipped"]}
    assert reasons["empty.wav"] == "empty file (0 bytes)" and "shorter than one frame" in reasons["short.wav"]
    assert "truncated" in reasons["truncated.wav"] and "cannot be decoded" in reasons["corrupt.flac"]
    for name, reason in reasons.items():
        assert any(f"warning: {name}: {reason}" in line for line in warnings)
    # the last line says where the time went; its parts add up to the total (each rounded to 0.1 s)
    last = r.stdout.strip().splitlines()[-1]
    total, *parts = (float(x) for x in re.findall(r"-?\d+\.\d", last))
    assert last.startswith("time: ") and len(parts) == 7 and abs(total - sum(parts)) <= 0.4, last
    assert parts[2] + parts[3] > 0 and all(p >= 0 for p in parts[:6]), last  # the codec ran (for ~10 s of audio)


def kill_after_cache_entries(args: list[str], out: str, n: int = 2) -> None:
    """Start prepare_audio.py and SIGKILL it once n entries are in out/.cache (the run must not have finished)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare_audio.py"), *args], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if len(glob.glob(os.path.join(out, ".cache", "*", "*.npz"))) >= n:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "meta.json")), "the run finished before it could be killed"


@pytest.mark.slow
def test_killed_run_resumes_byte_identical(prepared, tmp_path):
    ref, args, _ = prepared
    out = str(tmp_path / "out")
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={out}"]
    kill_after_cache_entries(args, out)
    # the decoded audio a worker was handing over when the run was killed (a file in the rank's scratch folder)
    left = glob.glob(os.path.join(out, ".cache", "*", "decoded.0"))
    assert len(left) == 1
    open(os.path.join(left[0], "0.0.f32"), "wb").write(b"\0" * 4000)
    r = run_prepare(*args)
    assert r.returncode == 0, r.stderr
    assert_same_output(ref, out)
    assert not glob.glob(os.path.join(out, ".cache", "*", "decoded.*"))  # emptied at the start, removed at the end


def test_strict_makes_a_bad_file_an_error(prepared, tmp_path):
    ref, args, _ = prepared
    out = str(tmp_path / "out")
    shutil.copytree(ref, out)  # with its cache: only the check runs
    r = run_prepare(*[a for a in args if not a.startswith("--out_dir")], f"--out_dir={out}", "--strict=true")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.flac" in errors[0] and "--strict" in errors[0]
    assert "Traceback" not in r.stderr


def test_a_failed_write_is_one_line_naming_the_file(prepared, tmp_path):
    """A write that fails (here: files capped at 40 kB, as a full disk would fail it) in a decoding worker, which
    hands its audio over in a file: one line naming that file, and the scratch folder is gone."""
    import resource

    def cap_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
    _, args, _ = prepared
    out = tmp_path / "out"
    r = run_prepare(*[a for a in args if not a.startswith("--out_dir")], f"--out_dir={out}", preexec_fn=cap_file_size)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "decoded.0" in errors[0] and ".f32: File too large" in errors[0], r.stderr
    assert not glob.glob(str(out / ".cache" / "*" / "decoded.*"))


def test_no_audio_or_no_hub_is_one_line_and_writes_nothing(tmp_path, codec_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio here")
    for dataset, expect in ((str(empty), "no audio files or .parquet files found"),
                            ("nobody-gpt2o/no-such-dataset", "--dataset=")):
        out = tmp_path / "out"
        r = run_prepare(f"--dataset={dataset}", f"--codec={codec_dir}", f"--out_dir={out}", "--device=cpu",
                        "--text_encoding=none")
        assert r.returncode == 1 and r.stdout.count("\n") <= 1  # at most the config line
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
        assert not out.exists()
    r = run_prepare("--help")
    keys = ("dataset", "codec", "out_dir", "device", "chunk_seconds", "val_files", "shard_tokens", "strict")
    assert r.returncode == 0 and all(f"--{k}=" in r.stdout for k in keys)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(prepared, tmp_path):
    ref, args, _ = prepared
    out = str(tmp_path / "out")
    r = run_prepare(*[a for a in args if not a.startswith("--out_dir")], f"--out_dir={out}", torchrun=True,
                    env={**ENV, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_output(ref, out)


def test_workers_are_capped_and_progress_reads_plainly(prepared, tmp_path):
    """--workers=500 on a few cores starts at most the cores, says so, and writes the same output; the echoed config
    starts with config: as in every script; progress on a few seconds of audio is not 5.56e-05 audio-h/s."""
    from prepare_audio import audio_rate
    assert [audio_rate(x) for x in (0.2, 30, 90, 7200)] == ["0.2 audio-s/s", "30 audio-s/s", "1.5 audio-min/s",
                                                           "2 audio-h/s"]
    ref, args, _ = prepared
    out = str(tmp_path / "out")
    r = run_prepare(*[a for a in args if not a.startswith("--out_dir")], f"--out_dir={out}", "--workers=500")
    assert r.returncode == 0, r.stderr
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert f"note: workers=500: capped at {cores}" in r.stdout and f"{cores} decoding worker(s)" in r.stdout
    assert r.stdout.startswith("note: workers=500") and "\nconfig: {" in r.stdout
    assert "audio-h/s" not in r.stderr and "audio-s/s" in r.stderr
    assert_same_output(ref, out)


def test_nothing_usable_leaves_nothing_behind_and_bad_values_are_named(tmp_path, codec_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "noise.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    (bad / "empty.flac").write_bytes(b"")
    out = tmp_path / "out"
    r = run_prepare(f"--dataset={bad}", f"--codec={codec_dir}", f"--out_dir={out}", "--device=cpu",
                    "--text_encoding=none")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "none of its 2 audio files" in errors[0], r.stderr
    assert not out.exists()  # README: nothing is written (no .cache/ either)
    for arg, expect in (("--val_files=-1", "val_files=-1: must be 0 (no val split) or more"),
                        ("--out_dir=", "out_dir=''"), ("--shard_tokens=0", "shard_tokens=0: must be at least 1")):
        r = run_prepare(f"--dataset={bad}", f"--codec={codec_dir}", arg, "--text_encoding=none")
        assert r.returncode == 1 and r.stderr.startswith("error: ") and expect in r.stderr, r.stderr


def test_full_disk_and_a_busy_out_dir_are_one_line(prepared, tmp_path, small_disk):
    from test_common import write_lock
    _, args, _ = prepared
    args = [a for a in args if not a.startswith("--out_dir")] + ["--workers=0"]
    folder, preexec = small_disk(1024)  # the lock fits (in one 4 kB page of a tmpfs), a cache entry does not
    r = run_prepare(*args, f"--out_dir={folder}/out", preexec_fn=preexec)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: {folder}/out/") and "run the same command again" in errors[0], errors[0]
    assert ("No space left on device" if preexec is None else "File too large") in errors[0], errors[0]
    assert not [f for _, _, files in os.walk(folder) for f in files if f.endswith(".tmp") or f == ".gpt2o.lock"]
    out = str(tmp_path / "busy")
    write_lock(out, os.getpid())  # another prepare_audio.py (this test's process) writes there
    r = run_prepare(*args, f"--out_dir={out}")
    assert r.returncode == 1 and r.stderr.startswith(f"error: out_dir {out}: in use by train.py (process "
                                                     f"{os.getpid()}") and r.stderr.count("\n") == 1, r.stderr
    assert os.listdir(out) == [".gpt2o.lock"]
