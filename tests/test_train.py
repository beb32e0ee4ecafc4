"""train.py end to end, on CPU, through its command line: DDP equivalence, exact resume, NaN stop, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_script
from tokenizer import Layout

LAYOUT = Layout((4, 2, 1), 4096)
TPS = 24000 / 2048 * LAYOUT.frame_size


def layout_stream(n_tokens: int, seed: int) -> np.ndarray:
    """Documents of [BOUNDARY] + whole frames with ids of the right level (few distinct codes, so loss can fall)."""
    rng = np.random.default_rng(seed)
    out = []
    total = 0
    while total < n_tokens:
        frames = int(rng.integers(3, 40))
        codes = rng.integers(0, 8, size=(frames, LAYOUT.frame_size))
        doc = np.concatenate([[LAYOUT.boundary_id], (codes + LAYOUT.frame_levels * LAYOUT.codebook_size).reshape(-1)])
        out.append(doc)
        total += len(doc)
    return np.concatenate(out or [[]])[:n_tokens].astype(np.uint16)


def write_dataset(folder: str, train_tokens: list[int], val_tokens: list[int], seed: int = 0) -> str:
    """A dataset folder in prepare_audio.py's format, with shards of exactly the given lengths."""
    os.makedirs(folder, exist_ok=True)
    shards, splits = [], {}
    for split, sizes in (("train", train_tokens), ("val", val_tokens)):
        stream = layout_stream(sum(sizes), seed + (split == "val"))
        start = 0
        for i, n in enumerate(sizes):
            name = f"{split}_{i:03d}.bin"
            stream[start:start + n].tofile(os.path.join(folder, name))
            shards.append({"file": name, "split": split, "tokens": n, "sources": [f"{split}{i}.wav"]})
            start += n
        splits[split] = {"tokens": sum(sizes), "seconds": sum(sizes) / TPS, "files": len(sizes)}
    meta = {"codec": "test", "sample_rate": 24000, "frame_hop": 2048, "tokens_per_second": TPS, **LAYOUT.meta(),
            "dtype": "uint16", "dataset": "synthetic", "shards": shards, "skipped": [], "splits": splits}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=2", "--dropout=0.0", "--learning_rate=3e-3", "--warmup_iters=2", "--peak_flops=1e11",
        "--eval_iters=2", "--eval_samples=0"]  # this dataset names no codec; tests/test_report.py samples


def run_train(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    # faulthandler: a process that aborts in native code (a rarely seen gloo SIGABRT under torchrun in CI) prints
    # the Python stack of every thread, so the failure says where it happened
    return run_script("train.py", *args, torchrun=torchrun, env={"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})


def read_log(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # shards shorter than one window (block 32 + 1), so windows cross shard ends; val smaller than one batch per rank
    folder = str(tmp_path_factory.mktemp("data"))
    return write_dataset(folder, train_tokens=[20, 500, 7, 300, 1000], val_tokens=[25, 15])


def test_token_stream_reads_across_shards(data):
    from dataset import load_dataset
    meta, streams = load_dataset(data)
    whole = np.concatenate([np.fromfile(os.path.join(data, s["file"]), dtype="<u2")
                            for s in meta["shards"] if s["split"] == "train"])
    stream = streams["train"]
    assert len(stream) == len(whole) == 1827
    starts = np.array([0, 10, 19, 515, 1790])
    got = stream.read(starts, 37)
    assert got.dtype == np.int64
    for row, s in zip(got, starts):
        np.testing.assert_array_equal(row, whole[s:s + 37])


@pytest.mark.slow
def test_ddp_two_processes_match_one(data, tmp_path):
    args = TINY + [f"--data_dir={data}", "--max_iters=8", "--gradient_accumulation_steps=4", "--log_interval=1",
                   "--eval_interval=4", "--dropout=0.1"]  # dropout masks, too, do not depend on the world size
    one = run_train(args + [f"--out_dir={tmp_path}/one"])
    assert one.returncode == 0, one.stderr
    two = run_train(args + [f"--out_dir={tmp_path}/two"], torchrun=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr
    log1, log2 = read_log(f"{tmp_path}/one"), read_log(f"{tmp_path}/two")
    assert [r["iter"] for r in log1] == [r["iter"] for r in log2]
    losses = [r["loss"] for r in log1 if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    for a, b in zip(log1, log2):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (a, b)
    assert "iter 7 | loss" in one.stdout and "| mfu" in one.stdout
    val = [r for r in log1 if "val_loss" in r]
    assert [r["iter"] for r in val] == [0, 4, 8]
    v = val[-1]
    assert abs(v["val_bps"] - v["val_audio_loss"] * TPS / np.log(2)) < 1e-6  # audio targets only
    levels = v["val_loss_levels"]
    assert {"L0", "L1", "L2"} <= set(levels) <= {"L0", "L1", "L2", "special"} and "val_text_loss" not in v
    audio = [levels[k] for k in ("L0", "L1", "L2")]
    assert min(audio) <= v["val_audio_loss"] <= max(audio)


def test_resume_is_exact_and_checkpoint_loads_weights_only(data, tmp_path):
    args = TINY + [f"--data_dir={data}", "--gradient_accumulation_steps=2", "--log_interval=1", "--eval_interval=3",
                   "--dropout=0.1",  # dropout on: its randomness must resume exactly too
                   "--lr_decay_iters=12"]  # the same schedule whether the run is told to stop at 6 or at 12
    full = run_train(args + ["--max_iters=12", f"--out_dir={tmp_path}/full"])
    assert full.returncode == 0, full.stderr
    half = run_train(args + ["--max_iters=6", f"--out_dir={tmp_path}/half"])
    assert half.returncode == 0, half.stderr
    ckpt = torch.load(f"{tmp_path}/half/ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_args"]["vocab_size"] == LAYOUT.vocab_size
    assert ckpt["meta"]["layout"] == LAYOUT.meta()["layout"] and ckpt["config"]["max_iters"] == 6
    rest = run_train(args + ["--max_iters=12", f"--out_dir={tmp_path}/half", "--init_from=resume"])
    assert rest.returncode == 0, rest.stderr
    full_log, resumed_log = read_log(f"{tmp_path}/full"), read_log(f"{tmp_path}/half")

    def strip(rows: list[dict]) -> list[dict]:  # timings differ between runs
        return [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "mfu")} for r in rows]

    assert strip(full_log) == strip(resumed_log)
    assert len([r for r in full_log if "loss" in r]) == 12
    a = torch.load(f"{tmp_path}/full/ckpt.pt", weights_only=True)
    b = torch.load(f"{tmp_path}/half/ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert os.path.isfile(f"{tmp_path}/full/best.pt")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    out = f"{tmp_path}/nan"
    # a learning rate of 1e30 sends every weight to ~1e30 in the first Adam step, and activations overflow
    r = run_train(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=10",
                          "--log_interval=5", "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training loss is"), r.stderr
    assert "at iteration 1 " in lines[0], r.stderr
    ckpt = torch.load(f"{out}/ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 0
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def bad(args: list[str], *names: str) -> None:
    assert_one_line_error(run_train(args), *names)


@pytest.mark.slow
def test_bad_input_is_one_line(data, tmp_path):
    bad([f"--data_dir={tmp_path}/nowhere"], "data_dir", "nowhere")
    bad([f"--data_dir={tmp_path}"], "meta.json")
    bad(TINY + [f"--data_dir={data}", "--block_size=5000"], "block_size=5000")
    bad(TINY + [f"--data_dir={data}", "--batch_sise=3"], "batch_sise")
    bad(TINY + [f"--data_dir={data}", "--batch_size=three"], "batch_size")
    broken = write_dataset(f"{tmp_path}/broken", [400, 300], [100])
    with open(f"{broken}/train_001.bin", "ab") as f:
        f.write(b"\0\0")
    bad(TINY + [f"--data_dir={broken}"], "train_001.bin", "meta.json")
    (tmp_path / "a_file").write_text("")
    bad(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}/a_file", "--max_iters=0"], "a_file")  # not a folder


def test_resume_with_other_vocab_is_one_line(data, tmp_path):
    out = f"{tmp_path}/out"
    assert run_train(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=0"]).returncode == 0
    other = write_dataset(f"{tmp_path}/other", [400], [100])
    with open(f"{other}/meta.json") as f:
        meta = json.load(f)
    meta.update(Layout((4, 2, 1), 2048).meta())  # same shape of layout, other codebook size and vocab
    with open(f"{other}/meta.json", "w") as f:
        json.dump(meta, f)
    bad(TINY + [f"--data_dir={other}", f"--out_dir={out}", "--init_from=resume"], "ckpt.pt", "codebook_size")


def test_trains_without_the_text_encoding(tmp_path):
    """A text+audio dataset whose text encoding cannot be loaded here (offline): training runs, and the one note
    says that eval's bits per byte of text are off."""
    data = write_dataset(f"{tmp_path}/data", [600], [200])
    with open(f"{data}/meta.json") as f:
        meta = json.load(f)
    meta.update(Layout((4, 2, 1), 4096, "gpt2o_test_unreachable", 457).meta())
    meta["splits"]["val"]["text_tokens"] = 10
    with open(f"{data}/meta.json", "w") as f:
        json.dump(meta, f)
    r = run_train(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--max_iters=1"])
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if "bits per byte of text are off" in line]
    assert len(notes) == 1 and "gpt2o_test_unreachable" in notes[0], r.stdout


def test_configs_parse():
    from config import parse_config
    from train import TrainConfig, check_config
    for name in ("tiny", "gpt2_speech", "sherlock"):
        cfg = parse_config(TrainConfig, [os.path.join(ROOT, "configs", f"{name}.py")])
        check_config(cfg, world_size=1)
    assert cfg.block_size == 2048 and cfg.dropout > 0


@pytest.mark.parametrize("arg,message", [
    ("--beta1=1.5", "beta1=1.5: must be in [0, 1)"), ("--beta2=-0.1", "beta2=-0.1: must be in [0, 1)"),
    ("--seed=-1", "seed=-1: must be in [0, 2**32)"), (f"--seed={2 ** 70}", "must be in [0, 2**32)"),
    ("--min_lr=1", "min_lr=1.0: must be at most learning_rate=0.0006"),
])
def test_out_of_range_settings_are_refused_before_any_work(arg, message):
    from common import UserError
    from config import parse_config
    from train import TrainConfig, check_config
    with pytest.raises(UserError) as e:
        check_config(parse_config(TrainConfig, [arg]), world_size=1)
    assert message in str(e.value)


@pytest.mark.slow
def test_scratch_run_never_replaces_a_trained_model(data, tmp_path):
    out = f"{tmp_path}/out"
    args = TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"]
    assert run_train(args).returncode == 0
    before = {name: open(f"{out}/{name}", "rb").read() for name in ("ckpt.pt", "best.pt", "log.jsonl")}
    # the Colab user who forgot --init_from=resume: one line naming the ways on, and nothing touched
    bad(args + ["--max_iters=1"], "out_dir", "--init_from=resume", "--out_dir", "--overwrite=True")
    assert before == {name: open(f"{out}/{name}", "rb").read() for name in before}
    # a run killed while writing a checkpoint left a temp file as big as the checkpoint: the next run removes it
    with open(f"{out}/ckpt.pt.x8k2_q1z.tmp", "wb") as f:
        f.write(before["ckpt.pt"][:1000])
    r = run_train(args + ["--max_iters=6", "--init_from=resume"])
    assert r.returncode == 0, r.stderr
    assert "removed ckpt.pt.x8k2_q1z.tmp" in r.stdout and not os.path.exists(f"{out}/ckpt.pt.x8k2_q1z.tmp")
    r = run_train(args + ["--max_iters=1", "--overwrite=True"])  # said explicitly: a new run in that out_dir
    assert r.returncode == 0, r.stderr
    assert torch.load(f"{out}/ckpt.pt", weights_only=True)["iter_num"] == 1


def test_no_val_split_compile_on_cpu_and_wandb_are_said_plainly(tmp_path):
    data = write_dataset(f"{tmp_path}/noval", [600], [])
    r = run_train(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--max_iters=2", "--compile=True"])
    assert r.returncode == 0, r.stderr
    assert "no eval" in r.stdout and "inf" not in r.stdout
    assert "compile is used on CUDA only" in r.stdout
    try:
        import wandb  # noqa: F401
        return  # installed here: nothing to check
    except ImportError:
        pass
    bad(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}/w", "--wandb_log=True"], "pip install wandb")
    assert not os.path.exists(f"{tmp_path}/w")  # before any work


@pytest.mark.slow
def test_torchrun_bad_config_is_said_once(data, tmp_path):
    r = run_train(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--gradient_accumulation_steps=3"],
                  torchrun=2)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gradient_accumulation_steps=3" in errors[0], r.stderr
    assert "Traceback" not in r.stderr.split("error:")[0]  # nothing of ours before it


def test_one_job_per_out_dir_and_a_new_run_starts_clean(data, tmp_path):
    from test_common import dead_pid, write_lock
    out = f"{tmp_path}/out"
    args = TINY + [f"--data_dir={data}", f"--out_dir={out}", "--eval_interval=2", "--log_interval=1"]
    assert run_train(args + ["--max_iters=2"]).returncode == 0
    os.makedirs(f"{out}/samples", exist_ok=True)
    with open(f"{out}/samples/iter000200_uncond0.wav", "wb") as f:  # the earlier run's last samples
        f.write(b"RIFF")
    with open(f"{out}/NOTES.md", "w") as f:
        f.write("mine")
    log = open(f"{out}/log.jsonl").read()
    write_lock(out, os.getpid())  # a job that is running (this test's own process) holds out_dir
    bad(args + ["--max_iters=1", "--overwrite=True"], f"out_dir {out}: in use by train.py (process {os.getpid()}")
    assert open(f"{out}/log.jsonl").read() == log and os.path.isfile(f"{out}/ckpt.pt")
    write_lock(out, dead_pid())  # ... and one killed with -9
    # peak_flops=1: an MFU of billions of percent, which is no figure
    r = run_train(args + ["--max_iters=1", "--overwrite=True", "--peak_flops=1"])
    assert r.returncode == 0, r.stderr
    assert "taken over from train.py" in r.stderr and "moved the earlier run's files" in r.stdout
    old = [name for name in os.listdir(out) if name.startswith("old-")]
    assert len(old) == 1 and sorted(os.listdir(f"{out}/{old[0]}")) == ["best.pt", "ckpt.pt", "config.json",
                                                                       "log.jsonl", "report.html", "samples"]
    assert open(f"{out}/{old[0]}/log.jsonl").read() == log
    assert not os.path.exists(f"{out}/samples") and open(f"{out}/NOTES.md").read() == "mine"
    page = open(f"{out}/report.html", encoding="utf-8").read()
    assert "At iteration 200" not in page and "No samples yet" in page and "iteration 1 of 1" in page
    assert "| mfu ? |" in r.stdout and all(row.get("mfu") is None for row in read_log(out) if "loss" in row)
    assert not os.path.exists(f"{out}/.gpt2o.lock")  # released at the end


def test_full_disk_is_one_line_and_says_what_is_intact(data, small_disk):
    folder, preexec = small_disk(256 * 1024)  # config.json and the log fit, a checkpoint does not
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={data}",
                        f"--out_dir={folder}/out", "--max_iters=2"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, preexec_fn=preexec,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {folder}/out/ckpt.pt: "), lines[0]
    assert "needs about" in lines[0] if preexec is None else "ulimit -f" in lines[0]
    assert "every checkpoint written before it is intact" in lines[0] and "--init_from=resume" in lines[0]
    assert sorted(os.listdir(f"{folder}/out")) == ["config.json", "log.jsonl"]  # no temp file, no lock


def test_eval_samples_are_bounded(data, tmp_path):
    bad(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--eval_samples=100000"], "eval_samples=100000",
        "to 64 samples")
    assert not os.path.exists(f"{tmp_path}/out")


def test_hand_edited_meta_json_is_refused(tmp_path):
    from dataset import load_dataset
    folder = write_dataset(str(tmp_path / "d"), [400], [100])
    with open(f"{folder}/meta.json") as f:
        meta = json.load(f)
    shard = meta["shards"][0]
    for change, words in ((dict(tokens_per_second=0), "tokens_per_second=0"),
                          (dict(tokens_per_second=-65.6), "tokens_per_second=-65.6"),
                          (dict(tokens_per_second="fast"), "tokens_per_second='fast'"),
                          (dict(shards=[{**shard, "file": "../../../etc/passwd"}]), "'../../../etc/passwd'"),
                          (dict(shards=[{**shard, "file": "/etc/passwd"}]), "'/etc/passwd'"),
                          (dict(shards=[{**shard, "file": ".."}]), "'..'")):
        with open(f"{folder}/meta.json", "w") as f:
            json.dump({**meta, **change}, f)
        with pytest.raises(ValueError, match="meta.json") as e:
            load_dataset(folder)
        assert words in str(e.value), str(e.value)
