"""Render a run's out_dir as report.html: one self-contained page of curves, eval samples, config and dataset.

    python report.py out/sherlock          # rebuild out/sherlock/report.html from log.jsonl and samples/

train.py calls refresh after every eval that wrote samples (samples.py), so the page is always current while a run
trains. The page holds its plots as inline PNG and the latest samples as inline WAV, so it can be copied or mailed as
one file; earlier samples are linked relative to it (out_dir/samples/).
"""
from __future__ import annotations

import base64
import functools
import glob
import html
import io
import json
import os
import re
import sys
import time

import numpy as np

from common import UserError, atomic_write, format_duration, read_json, run_main, user_errors


# -----------------------------------------------------------------------------
# where the eval samples are: out_dir/samples/iter<iteration>_<name>.wav (samples.py writes them)

SAMPLE_NAME = re.compile(r"^iter(\d+)_(\w+)\.wav$")  # samples/iter000500_uncond0.wav


def sample_path(out_dir: str, it: int, name: str) -> str:
    return os.path.join(out_dir, "samples", f"iter{it:06d}_{name}.wav")


def list_samples(out_dir: str) -> dict[int, list[str]]:
    """{iteration: [wav paths]} of every eval sample in out_dir/samples/, by iteration."""
    found: dict[int, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "samples", "iter*.wav"))):
        m = SAMPLE_NAME.match(os.path.basename(path))
        if m:
            found.setdefault(int(m.group(1)), []).append(path)
    return dict(sorted(found.items()))


# -----------------------------------------------------------------------------
# the report

NUMBERS = ("loss", "lr", "ms", "tok_s", "mfu", "val_loss", "val_bps", "val_audio_loss", "val_text_loss",
           "val_text_bpb", "sample_s", "eval_wer", "eval_cer",
           "eval_sim", "asr_s")  # the figures a row may hold (mfu may be null: no figure)


def read_log(path: str, warnings: list[str] | None = None) -> list[dict]:
    """log.jsonl rows; a line cut short by a kill is skipped, and so is a row that is not one of train.py's (an
    `iter` that is not a whole number, a figure that is not a number): said in `warnings` when given."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a kill mid-line: expected, not worth a warning
            levels = row.get("val_loss_levels", {}) if isinstance(row, dict) else None
            if not isinstance(row, dict) or not is_number(row.get("iter"), whole=True) or not all(
                    is_number(row[k]) for k in NUMBERS if row.get(k) is not None) or not isinstance(levels, dict) \
                    or not all(is_number(v) for v in levels.values()):
                if warnings is not None:
                    warnings.append(f"{path}, line {n}: not a log row of train.py (iter and figures must be "
                                    "numbers); skipped")
                continue
            rows.append(row)
    return rows


def is_number(x, whole: bool = False) -> bool:
    return not isinstance(x, bool) and isinstance(x, int if whole else (int, float))


def png(fig) -> str:
    """A matplotlib Figure -> a data: URI of its PNG (drawn by Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(train: list[dict], evals: list[dict], tokens_per_iter: int) -> list[tuple[str, str]]:
    """(title, PNG data URI) of each curve against iterations (bottom axis) and tokens seen (top axis)."""
    from matplotlib.figure import Figure

    def axes(title: str, ylabel: str, log_y: bool = False):
        fig = Figure(figsize=(4.1, 3.0), dpi=90)
        fig.subplots_adjust(left=0.19, right=0.84, bottom=0.15, top=0.76)  # fixed margins: no layout engine
        ax = fig.add_subplot()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
        if tokens_per_iter:
            top = ax.secondary_xaxis("top", functions=(lambda i: i * tokens_per_iter / 1e6,
                                                       lambda t: t * 1e6 / tokens_per_iter))
            top.set_xlabel("tokens seen (millions)", fontsize=8)
        return fig, ax

    def col(rows: list[dict], key: str) -> tuple[list, list]:
        rows = [r for r in rows if r.get(key) is not None]
        return [r["iter"] for r in rows], [r[key] for r in rows]

    out = []
    fig, ax = axes("loss", "nats per token")
    ax.plot(*col(train, "loss"), label="train", lw=1)
    ax.plot(*col(evals, "val_loss"), "o-", label="val", ms=3)
    ax.legend()
    out.append(("loss", png(fig)))
    fig, ax = axes("val bits per second of audio", "bits/s")
    ax.plot(*col(evals, "val_bps"), "o-", color="C1", ms=3)
    out.append(("val bits per second", png(fig)))
    fig, ax = axes("val loss per codec level (of the target token)", "nats per token")
    names = sorted({k for r in evals for k in r.get("val_loss_levels", {})}, key=lambda k: (k == "special", k))
    for name in names:
        its = [r["iter"] for r in evals if name in r.get("val_loss_levels", {})]
        ax.plot(its, [r["val_loss_levels"][name] for r in evals if name in r.get("val_loss_levels", {})], "o-",
                label=name, ms=3)
    if names:
        ax.legend(fontsize=8)
    out.append(("val loss per level", png(fig)))
    fig, ax = axes("learning rate", "lr")
    ax.plot(*col(train, "lr"), color="C2")
    out.append(("learning rate", png(fig)))
    fig, ax = axes("throughput", "thousand tokens/s")
    its, tok_s = col(train, "tok_s")
    ax.plot(its, [t / 1e3 for t in tok_s], color="C3")
    ratio = [r["mfu"] / r["tok_s"] for r in train if r.get("mfu") and r.get("tok_s")]
    if ratio:  # MFU is tok/s times a constant (FLOPs per token / peak): one line, a second scale on the right
        k = float(np.mean(ratio)) * 1e3 * 100
        ax.secondary_yaxis("right", functions=(lambda t: t * k, lambda m: m / k)).set_ylabel("MFU %")
    out.append(("throughput and MFU", png(fig)))
    if any(r.get("eval_wer") is not None for r in evals):  # train.py's eval_asr: the spoken samples' figures
        fig, ax = axes("spoken samples: ASR error rates", "%")
        for key in ("eval_wer", "eval_cer"):
            its, rates = col(evals, key)
            ax.plot(its, [x * 100 for x in rates], "o-", label=key[5:].upper(), ms=3)
        its, sims = col(evals, "eval_sim")
        if sims:  # a cosine, on its own scale on the right
            right = ax.twinx()
            right.plot(its, sims, "s--", color="C4", ms=3)
            right.set_ylabel("SIM (dashed)")
        ax.legend(fontsize=8)
        out.append(("spoken samples: WER", png(fig)))
    return out


def spectrogram(audio: np.ndarray, sample_rate: int) -> str:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.1, 2.0), dpi=90)
    fig.subplots_adjust(left=0.19, right=0.96, bottom=0.24, top=0.95)
    ax = fig.add_subplot()
    seconds = len(audio) / sample_rate
    if len(audio) >= 512:  # the image spans the whole file (matplotlib's default starts and ends half a window in)
        ax.specgram(audio, NFFT=512, Fs=sample_rate, noverlap=384, cmap="magma", vmin=-120, xextent=(0, seconds))
    ax.set_xlim(0, seconds)
    ax.set_xlabel("seconds")
    ax.set_ylabel("Hz")
    return png(fig)


@functools.lru_cache(maxsize=8)
def sample_card(path: str, mtime: float) -> str:
    """A sample's name, player (the WAV inline) and spectrogram. Cached by (path, mtime): evals that skip their
    samples rebuild the page without drawing these again."""
    import soundfile as sf
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)  # one spectrogram, of what a listener hears
    with open(path, "rb") as f:
        uri = "data:audio/wav;base64," + base64.b64encode(f.read()).decode()
    name = html.escape(SAMPLE_NAME.match(os.path.basename(path)).group(2))
    return (f'<div class=sample><b>{name}</b> ({len(audio) / sr:.2f} s)<audio controls preload="metadata" '
            f'src="{uri}"></audio><img alt="spectrogram of {name}" src="{spectrogram(audio, sr)}"></div>')


def sample_card_or_note(path: str, warnings: list[str]) -> str:
    """sample_card, or for a file that cannot be read (damaged, cut short) a note on the page and a warning."""
    try:
        return sample_card(path, os.path.getmtime(path))
    except Exception as e:  # soundfile and matplotlib raise many types for a damaged file
        warnings.append(f"{path}: cannot be read as audio ({type(e).__name__}: {str(e)[:120]}); left out")
        name = html.escape(os.path.basename(path))
        return f"<div class=sample><b>{name}</b> (cannot be read: damaged or cut short)</div>"


def table(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table>{rows}</table>"


def dataset_summary(meta: dict | None, where: str) -> dict:
    if not meta:
        return {"meta.json": f"not found at {where}"}
    out = {"dataset": meta.get("dataset"), "codec": meta.get("codec"), "sample rate": meta.get("sample_rate"),
           "tokens per second of audio": meta.get("tokens_per_second"), "layout": meta.get("layout"),
           "vocab size": meta.get("vocab_size")}
    for split, s in (meta.get("splits") or {}).items():
        out[f"{split} split"] = (f"{s.get('tokens', 0):,} tokens, {s.get('seconds', 0) / 3600:.2f} h of audio, "
                                 f"{s.get('files', 0)} files")
    if meta.get("skipped"):
        out["skipped files"] = len(meta["skipped"])
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1160px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.summary{color:#444;margin:6px 0 0;line-height:1.5}.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid img{border:1px solid #eee}.sample{border:1px solid #ddd;padding:8px;border-radius:6px}
.sample audio{width:100%;display:block;margin:6px 0}table{border-collapse:collapse;font-size:13px}
th,td{text-align:left;padding:2px 10px;border-bottom:1px solid #f0f0f0;vertical-align:top}
th{font-weight:600;color:#555}.cols{display:flex;gap:40px;flex-wrap:wrap}a{color:#0645ad}"""


def build_report(out_dir: str, meta: dict | None = None) -> str:
    """Write out_dir/report.html (atomically) from config.json, log.jsonl and samples/; returns its path.
    meta is the dataset's meta.json (read from the config's data_dir when not given)."""
    cfg = read_json(os.path.join(out_dir, "config.json"), "run config")
    meta_path = os.path.join(cfg.get("data_dir", ""), "meta.json")
    if meta is None and os.path.isfile(meta_path):
        meta = read_json(meta_path, "dataset meta")
    warnings: list[str] = []
    rows = read_log(os.path.join(out_dir, "log.jsonl"), warnings)
    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("val_loss") is not None]
    tokens_per_iter = cfg.get("gradient_accumulation_steps", 0) * cfg.get("batch_size", 0) * cfg.get("block_size", 0)
    it = max((r["iter"] for r in rows), default=0)
    max_iters = f"{cfg['max_iters']:,}" if is_number(cfg.get("max_iters"), whole=True) else "?"
    summary = [f"iteration {it:,} of {max_iters}", f"{it * tokens_per_iter / 1e6:,.1f}M tokens seen"]
    if train:
        latest = max(reversed(train), key=lambda r: r["iter"])  # the latest by iteration (last in the file on a tie)
        at = f" at iteration {latest['iter']:,}" if latest["iter"] != it else ""  # evals come before a step's log
        summary.append(f"train loss {latest['loss']:.4f}{at}")
        ms = [r["ms"] for r in train[-5:] if "ms" in r]
        if ms and isinstance(cfg.get("max_iters"), int) and it < cfg["max_iters"]:
            summary.append(f"time left about {format_duration(max(0, cfg['max_iters'] - it) * np.mean(ms) / 1e3)}")
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        bps = f" ({best['val_bps']:.0f} bits/s)" if best.get("val_bps") is not None else ""
        summary.append(f"best val loss {best['val_loss']:.4f}{bps} at iteration {best['iter']:,}")
        spoken = [r for r in evals if r.get("eval_wer") is not None]
        if spoken:
            sim = f", SIM {spoken[-1]['eval_sim']:.3f}" if spoken[-1].get("eval_sim") is not None else ""
            summary.append(f"spoken samples: WER {spoken[-1]['eval_wer'] * 100:.1f}%{sim} at iteration "
                           f"{spoken[-1]['iter']:,}")
    summary.append("updated " + time.strftime("%Y-%m-%d %H:%M:%S"))

    body = [f"<h1>gpt2o run: {html.escape(os.path.abspath(out_dir))}</h1>",
            f"<p class=summary>{' &middot; '.join(html.escape(s) for s in summary)}</p>", "<h2>Curves</h2>"]
    if rows:
        body.append("<div class=grid>" + "".join(f'<img alt="{html.escape(t)}" src="{uri}">'
                                                 for t, uri in plots(train, evals, tokens_per_iter)) + "</div>")
    else:
        body.append("<p>No log lines yet.</p>")

    samples = list_samples(out_dir)
    body.append("<h2>Samples</h2>")
    if samples:
        latest = max(samples)
        body.append(f"<p>At iteration {latest:,}:</p><div class=grid>")
        body += [sample_card_or_note(path, warnings) for path in samples[latest]]
        body.append("</div>")
        earlier = [f"iteration {i:,}: " + ", ".join(f'<a href="samples/{html.escape(os.path.basename(p))}">'
                                          f'{html.escape(SAMPLE_NAME.match(os.path.basename(p)).group(2))}</a>'
                                          for p in paths)
                   for i, paths in reversed(samples.items()) if i != latest]
        if earlier:
            body.append("<p>Earlier (files next to this page, in samples/): " + " &middot; ".join(earlier) + "</p>")
    else:
        body.append("<p>No samples yet (they are written at every eval; --eval_samples=0 turns them off).</p>")

    body.append("<div class=cols><div><h2>Config</h2>" + table(cfg) + "</div><div><h2>Dataset</h2>"
                + table(dataset_summary(meta, meta_path)) + "</div></div>")
    page = ("<!doctype html><html><head><meta charset=utf-8><title>gpt2o: "
            f"{html.escape(os.path.basename(os.path.abspath(out_dir)))}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    atomic_write(path, lambda f: f.write(page), mode="w", size=len(page.encode()))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    return path


def refresh(out_dir: str, meta: dict) -> None:
    """build_report for train.py at every eval: a page that cannot be built is a warning, not the end of a run."""
    try:
        build_report(out_dir, meta)
    except Exception as e:  # any bug here must not cost hours of training
        print(f"warning: {os.path.join(out_dir, 'report.html')} not updated ({type(e).__name__}: {e}); "
              f"`python report.py {out_dir}` shows the whole error", file=sys.stderr, flush=True)


def main() -> None:
    args = sys.argv[1:]
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if len(args) != 1:
        raise UserError(f"expected one argument, the out_dir of a train.py run (got {len(args)}): "
                        "python report.py out/sherlock")
    if not os.path.isfile(os.path.join(args[0], "config.json")):
        raise UserError(f"out_dir {args[0]}: has no config.json; pass the out_dir of a train.py run")
    with user_errors():  # an unreadable config.json or meta.json
        path = build_report(args[0])
    print(path)


if __name__ == "__main__":
    run_main(main)
