"""Watching a run: eval samples leave training untouched (exact resume holds with them on), their time budget,
report.html (rebuilt by train.py and by report.py) rendered in a real headless Chromium."""
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import assert_one_line_error, run_script
from test_train import TINY, read_log, run_train, write_dataset

import report
from model import GPT, GPTConfig
from samples import EvalSamples

SECONDS = 0.2  # eval samples of 3 frames: the test is about where they go, not how they sound
SAMPLES = ["--eval_samples=2", f"--eval_sample_seconds={SECONDS}"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def data(tmp_path_factory, codec_dir):
    """A dataset whose meta.json names the offline random codec, so train.py can decode its samples."""
    folder = write_dataset(str(tmp_path_factory.mktemp("data")), train_tokens=[600, 400], val_tokens=[100])
    with open(f"{folder}/meta.json") as f:
        meta = json.load(f)
    meta["codec"] = codec_dir
    with open(f"{folder}/meta.json", "w") as f:
        json.dump(meta, f)
    return folder


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One run of 8 iterations, and the same run stopped at 4 and resumed to 8, all with eval samples on."""
    out = tmp_path_factory.mktemp("runs")
    args = TINY + SAMPLES + [f"--data_dir={data}", "--gradient_accumulation_steps=2", "--log_interval=1",
                             "--eval_interval=2", "--dropout=0.1", "--lr_decay_iters=8"]
    full = run_train(args + ["--max_iters=8", f"--out_dir={out}/full"])
    assert full.returncode == 0, full.stderr
    half = run_train(args + ["--max_iters=4", f"--out_dir={out}/half"])
    assert half.returncode == 0, half.stderr
    rest = run_train(args + ["--max_iters=8", f"--out_dir={out}/half", "--init_from=resume"])
    assert rest.returncode == 0, rest.stderr
    return str(out), full.stdout


@pytest.mark.slow
def test_exact_resume_with_samples_on(runs):
    out, stdout = runs

    def strip(rows: list[dict]) -> list[dict]:  # timings differ between runs, and so do the budgeted samples
        return [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "mfu", "sample_s")} for r in rows]

    full, resumed = read_log(f"{out}/full"), read_log(f"{out}/half")
    assert strip(full) == strip(resumed)
    a = torch.load(f"{out}/full/ckpt.pt", weights_only=True)
    b = torch.load(f"{out}/half/ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the first and the last eval always sample (others as the time budget allows); the stopped run sampled at 4
    assert {0, 8} <= set(report.list_samples(f"{out}/full")) and 4 in report.list_samples(f"{out}/half")
    sampled = [r for r in full if "sample_s" in r]
    assert {0, 8} <= {r["iter"] for r in sampled} and all(r["sample_s"] > 0 for r in sampled)
    assert f"iter 8 | samples 2 x {SECONDS:g} s in" in stdout
    assert "| eta " in stdout  # the console line says how long is left
    for path in report.list_samples(f"{out}/full")[8]:
        info = sf.info(path)
        assert info.samplerate == 24000 and info.frames == 3 * 2048  # ceil(0.2 s / 85.3 ms) = 3 whole frames
    assert os.path.isfile(f"{out}/full/report.html")


def test_samples_leave_rng_and_mode_alone(codec_dir, tmp_path):
    """Sampling (and loading the codec, whose random init draws from the global RNG) must not move training's RNG."""
    from codec import load_codec
    meta = load_codec(codec_dir).meta()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=64, n_layer=1, n_head=1, n_embd=16, dropout=0.1))
    samples = EvalSamples(str(tmp_path), meta, 2, SECONDS, "cpu", seed=1)
    state = torch.get_rng_state()
    assert samples(model, 10) and model.training
    assert torch.equal(state, torch.get_rng_state())
    first = [sf.read(p)[0] for p in report.list_samples(str(tmp_path))[10]]
    samples(model, 20, last=True)
    second = [sf.read(p)[0] for p in report.list_samples(str(tmp_path))[20]]
    for x, y in zip(first, second):  # the same seed at every eval: the same model gives the same audio
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], first[1])  # two different samples, not one twice


def test_sample_budget(codec_dir, tmp_path):
    samples = EvalSamples(str(tmp_path), {"codec": codec_dir}, 2, SECONDS, "cpu", seed=1)
    assert samples.due(last=False)  # the first eval always samples
    samples.calls, samples.spent, samples.cost = 1, 1.0, 1.0  # one sampling of 1 s so far
    samples.t_start = time.perf_counter() - 10  # 9 s of other work: 1 + 1 s would be 22% of it
    assert not samples.due(last=False)
    assert samples.due(last=True)  # the last eval always samples
    samples.t_start = time.perf_counter() - 30  # 29 s of other work: 2 s is 6.9%
    assert samples.due(last=False)
    assert EvalSamples(str(tmp_path), {}, 0, SECONDS, "cpu", seed=1)(None, 0) == {}  # --eval_samples=0


def test_unloadable_or_wrong_codec_turns_samples_off_with_one_warning(codec_dir, tmp_path, capsys):
    samples = EvalSamples(str(tmp_path), {"codec": str(tmp_path / "no_codec")}, 2, SECONDS, "cpu", seed=1)
    assert samples(None, 0) == {} and samples(None, 2, last=True) == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: eval samples are off") and "--eval_samples=0" in err[0]
    # --codec names a codec that is not the dataset's (another codebook size): off, not garbage audio
    meta = {"codec": "elsewhere", "vq_strides": [4, 2, 1], "codebook_size": 2048}
    samples = EvalSamples(str(tmp_path), meta, 2, SECONDS, "cpu", seed=1, codec=codec_dir)
    assert samples(None, 0) == {} and not os.path.exists(tmp_path / "samples")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "codebook_size 4096" in err[0] and "--codec" in err[0]


@pytest.mark.slow
def test_report_script_and_bad_input(runs, tmp_path):
    out = f"{runs[0]}/full"
    os.remove(f"{out}/report.html")
    r = run_script("report.py", out, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"{out}/report.html", r.stderr
    page = open(f"{out}/report.html", encoding="utf-8").read()
    assert page.count('src="data:image/png;base64,') == 5 + 2  # five curves, one spectrogram per sample
    assert page.count('<audio controls') == 2 and 'href="samples/iter000000_uncond0.wav"' in page
    # a run with no log and no samples yet still gets a page
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"max_iters": 10, "data_dir": str(tmp_path)}))
    page = open(report.build_report(str(tmp_path / "empty")), encoding="utf-8").read()
    assert "No log lines yet" in page and "No samples yet" in page
    for args in ([str(tmp_path / "nowhere")], [], [out, out]):
        assert_one_line_error(run_script("report.py", *args, timeout=60))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(runs, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    from PIL import Image
    url = "file://" + os.path.abspath(f"{runs[0]}/full/report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}/profile"]
    shot = tmp_path / "report.png"
    r = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2400", url], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # (2400, 1200, 3)
    assert pixels.shape == (2400, 1200, 3)
    assert (pixels.min(axis=2) < 128).mean() > 0.01  # text and lines: not a blank page
    colour = (pixels.max(axis=2) - pixels.min(axis=2)) > 80  # plot lines and spectrograms; text is grey
    assert colour.mean() > 0.01, colour.mean()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img ") == 7 and dom.count('src="data:image/png;base64,') == 7
    assert dom.count("<audio ") == 2 and dom.count('src="data:audio/wav;base64,') == 2
    assert "val bits per second" in dom and "gradient_accumulation_steps" in dom  # a plot's alt text, the config


def test_eval_samples_are_generated_in_bounded_batches(codec_dir, tmp_path, monkeypatch):
    import sampling
    from codec import load_codec
    from samples import SAMPLE_BATCH
    meta = {**load_codec(codec_dir).meta(), "codec": codec_dir}
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=64, n_layer=1, n_head=1, n_embd=16))
    sizes, generate_tokens = [], sampling.generate_tokens

    def counted(*args, **kw):
        sizes.append(kw["num_samples"])
        return generate_tokens(*args, **kw)
    monkeypatch.setattr(sampling, "generate_tokens", counted)
    assert EvalSamples(str(tmp_path), meta, SAMPLE_BATCH + 1, SECONDS, "cpu", seed=1)(model, 0)
    assert sizes == [SAMPLE_BATCH, 1] and len(report.list_samples(str(tmp_path))[0]) == SAMPLE_BATCH + 1


def test_a_damaged_log_or_sample_is_a_warning_and_the_rest_renders(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"max_iters": 100, "data_dir": str(tmp_path)}))
    rows = [{"iter": 10, "loss": 3.5, "lr": 1e-3, "ms": 10.0, "tok_s": 1e4, "mfu": 0.1},
            {"iter": "ten", "loss": 9.0},  # hand-edited
            {"iter": 20, "loss": 3.0, "lr": 1e-3, "ms": 10.0, "tok_s": 1e4, "mfu": None},  # an MFU that was no figure
            {"iter": 30, "val_loss": 2.5, "val_bps": 250.0, "val_loss_levels": {"L0": 2.5}}]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iter": 4')  # cut by a kill
    sf.write(out / "samples" / "iter000030_uncond0.wav", np.zeros(4800, dtype=np.float32), 24000)
    (out / "samples" / "iter000030_uncond1.wav").write_bytes(b"RIFF\x00\x01garbage")
    page = open(report.build_report(str(out)), encoding="utf-8").read()
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and "log.jsonl, line 2" in warnings[0] and "iter000030_uncond1.wav" in warnings[1]
    # the page is at iteration 30 (an eval); its train loss is the latest, at 20, and says so
    assert "iteration 30 of 100" in page and "train loss 3.0000 at iteration 20" in page
    assert "uncond0</b> (0.20 s)" in page and "iter000030_uncond1.wav</b> (cannot be read" in page
    assert page.count('<audio controls') == 1


def test_spectrogram_spans_the_sample(monkeypatch):
    figures = []
    monkeypatch.setattr(report, "png", lambda fig: figures.append(fig) or "")
    report.spectrogram(np.random.default_rng(0).standard_normal(4800).astype(np.float32), 24000)  # 0.2 s
    ax = figures[0].axes[0]
    assert ax.get_xlim() == (0, 0.2) and ax.images[0].get_extent()[:2] == [0, 0.2]
