"""Export a trained checkpoint as a folder anyone can load without pickle, and optionally publish it on the Hub.

    python export.py --ckpt=out/sherlock/best.pt --out=exported/sherlock
    python export.py --ckpt=out/xl/best --out=exported/xl     # a --fsdp run's sharded folder, gathered here
    python export.py --ckpt=out/sherlock/best.pt --out=exported/sherlock --repo_id=you/gpt2o-sherlock --push --overwrite
    python generate.py --ckpt=exported/sherlock          # or --ckpt=you/gpt2o-sherlock once it is pushed
    python export.py --help

The folder is a transformers GPT-2 (model.safetensors, config.json, generation_config.json: GPT2LMHeadModel loads it
and gives our logits), which gpt2o's own loader reads too, plus meta.json (token layout, codec, dataset summary,
training summary) and README.md, a model card with the run's figures, the latest eval samples and the commands to
use it, in gpt2o and in transformers (hf.FrameValidLogits). No file names a local absolute path. It is written
to a temp folder and renamed into place. meta.json lists the files export.py wrote, with their SHA-256: an earlier
export is replaced only with --overwrite=True, and then only those files: files added or edited since are kept (or,
where the new export would replace them, named in a refusal). --push uploads export.py's files with huggingface_hub
(your token: HF_TOKEN or `hf auth login`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

from checkpoints import check_compatible, load_checkpoint, tokenizer_meta
from common import UserError, atomic_write, run_main, user_errors, write_json
from config import parse_config
from hf import GPT2_SIZES, export_files
from distributed import is_sharded, load_consolidated
from report import list_samples, read_log
from tokenizer import Layout


EXPORT_MARK = "gpt2o export.py"  # meta.json's "export": {"by": EXPORT_MARK, "files": {path: sha256}}


@dataclass
class ExportConfig:
    ckpt: str = "out/sherlock/best.pt"  # a checkpoint written by train.py (best.pt, or a --fsdp run's best/)
    out: str = "exported/sherlock"  # the folder to write: new, empty, or an earlier export (with --overwrite=True)
    overwrite: bool = False  # replace the files of an earlier export in out (files you added there are kept)
    license: str = "mit"  # the model card's license (a Hub license id: mit, apache-2.0, cc-by-4.0, ...)
    repo_id: str = ""  # user/name on the Hugging Face Hub: the model card names it, --push uploads there
    push: bool = False  # upload the folder to repo_id (creates the repo if needed)
    private: bool = False  # create the Hub repo private


def training_summary(ckpt: dict, ckpt_path: str) -> dict:
    """What the model card reports: iterations, tokens seen, and the val figures of this very checkpoint (from
    the run's log.jsonl beside it; best.pt's own val loss is its best_val_loss)."""
    cfg = ckpt.get("config") or {}
    it = int(ckpt.get("iter_num", 0))
    tokens_per_iter = cfg.get("gradient_accumulation_steps", 0) * cfg.get("batch_size", 0) * cfg.get("block_size", 0)
    out = {"iter_num": it, "tokens_seen": it * tokens_per_iter, "init_from": cfg.get("init_from", "scratch"),
           "config": cfg}
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    rows = [r for r in read_log(os.path.join(run_dir, "log.jsonl")) if r.get("iter") == it and "val_loss" in r]
    if rows:
        out.update({k: rows[-1][k] for k in ("val_loss", "val_bps", "val_loss_levels") if k in rows[-1]})
    elif os.path.basename(os.path.normpath(ckpt_path)) in ("best.pt", "best") and \
            math.isfinite(ckpt.get("best_val_loss", math.inf)):
        out["val_loss"] = ckpt["best_val_loss"]
        out["val_bps"] = out["val_loss"] * float(ckpt["meta"]["tokens_per_second"]) / math.log(2)
    return out


def local_name(value):
    """What an exported file may say of a local path: an absolute path becomes its last name (another machine's
    folders mean nothing to a user, and may say more than the exporter wants); lists and dicts item by item."""
    if isinstance(value, dict):
        return {k: local_name(v) for k, v in value.items()}
    if isinstance(value, list):
        return [local_name(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(os.path.normpath(value))
    return value


def base_model(init_from: str) -> str:
    """The Hub model a run was fine-tuned from ("" for none, or a local file or folder)."""
    init_from = GPT2_SIZES.get(init_from, init_from)
    if init_from in ("", "scratch", "resume") or os.path.exists(init_from) or init_from.endswith(".pt"):
        return ""
    return init_from if init_from.count("/") == 1 and not init_from.startswith((".", "/", "~")) else ""


def model_card(cfg: ExportConfig, meta: dict, model_args: dict, n_params: int, summary: dict,
               samples: list[str]) -> str:
    """README.md: metadata from huggingface_hub's ModelCardData, then how to use the model, with gpt2o and with
    transformers, and what it was trained on."""
    from huggingface_hub import ModelCardData
    name = cfg.repo_id or os.path.basename(os.path.abspath(cfg.out))
    where = cfg.repo_id or local_name(cfg.out)
    tps, hop, sr = float(meta["tokens_per_second"]), meta.get("frame_hop"), meta.get("sample_rate")
    splits = meta.get("splits") or {}
    data = ", ".join(f"{split}: {s.get('seconds', 0) / 3600:.2f} h of audio, {s.get('tokens', 0):,} tokens, "
                     f"{s.get('files', 0)} files" for split, s in splits.items())
    codec = meta.get("codec", "")
    local_codec = os.path.isabs(codec)
    codec_flag = " --codec=<your copy of the codec folder>" if local_codec else ""
    codec = local_name(codec)
    text = bool(meta.get("text_vocab"))
    base = base_model(summary.get("init_from") or "")
    dataset = meta.get("dataset", "unknown")
    card = ModelCardData(
        license=cfg.license, library_name="transformers", pipeline_tag="text-to-speech" if text else "audio-to-audio",
        base_model=base or None, datasets=[dataset] if meta.get("dataset_hub") else None,
        tags=["audio", "speech", "snac", "gpt2", "gpt2o"] + (["text-to-speech", "speech-recognition"] if text else []))
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# {name}", "",
        f"A GPT-2 that speaks: a {n_params / 1e6:.1f}M-parameter GPT-2 trained with gpt2o on the discrete codes of "
        f"the SNAC neural codec `{codec}`, flattened into one stream of {tps:.2f} tokens per second of "
        f"{sr} Hz audio ({meta.get('frame_size')} tokens per {hop}-sample frame, layout `{meta.get('layout')}`"
        + (f", text ids of the `{meta.get('text_encoding')}` encoding first" if text else "") + "). "
        + ("It reads text aloud, writes down what it hears, and continues audio" if text else
           "It continues audio, or makes it up from nothing,") + " one token at a time; the codec turns the tokens "
        "back into sound.", "",
        "## Use", "",
        "```bash",
        "pip install -r requirements.txt     # in a checkout of gpt2o",
        f"python generate.py --ckpt={where} --num_samples=4 --seconds=10{codec_flag}",
        f"python generate.py --ckpt={where} --prompt=voice.flac --prompt_seconds=5 --seconds=10{codec_flag}",
    ]
    if text:
        lines += [f'python generate.py --ckpt={where} --text="It is a capital mistake to theorize before one has '
                  f'data."{codec_flag}',
                  f"python generate.py --ckpt={where} --transcribe=recording.flac{codec_flag}"]
    lines += [f"python train.py configs/sherlock.py --init_from={where} --data_dir=data/yours   # fine-tune it",
              "```", ""]
    voices = meta.get("voices") or []
    if voices:  # speakers of the training data, spoken with generate.py --voice
        lines += [f"Voices ({len(voices)}): {', '.join(f'`{v}`' for v in voices)}. Speak in one of them:", "",
                  f"```bash\npython generate.py --ckpt={where} --text=\"Hello there.\" --voice={voices[0]}"
                  f"{codec_flag}\n```", ""]
    if local_codec:
        lines += [f"The codec was a local folder when this model was trained (`{codec}`): pass your copy of it "
                  "with `--codec`.", ""]
    context = "layout.speech_context(enc.encode_ordinary(\"Hello there.\"))" if text else "layout.audio_context()"
    lines += ["### With transformers", "",
              "The folder is a GPT-2 that `transformers` loads as it is. `FrameValidLogits` (gpt2o's `hf.py`, no "
              "transformers import of its own) keeps sampling to ids the codec can decode:", "",
              "```python",
              "import json, torch",
              "from huggingface_hub import snapshot_download",
              "from transformers import AutoModelForCausalLM, LogitsProcessorList",
              "from hf import FrameValidLogits             # in a checkout of gpt2o",
              "from tokenizer import Layout" + (", load_text_encoding" if text else ""), "",
              f'folder = snapshot_download("{cfg.repo_id or "<user>/<name>"}")   # or the local folder',
              'meta = json.load(open(f"{folder}/meta.json"))',
              "model = AutoModelForCausalLM.from_pretrained(folder)",
              "layout = Layout.from_meta(meta)",
              *(['enc = load_text_encoding(meta["text_encoding"])'] if text else []),
              f"ids = torch.as_tensor({context})[None]",
              "out = model.generate(ids, max_new_tokens=model.config.n_positions - ids.shape[1],   # a context's worth",
              "                     logits_processor=LogitsProcessorList([FrameValidLogits(meta)]))",
              "audio_ids = layout.repair(out[0, ids.shape[1]:].numpy())   # whole frames, ready for the codec",
              "```", ""]
    lines += ["## Model", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in model_args.items()]
    lines += [f"| parameters | {n_params:,} |",
              f"| context | {model_args['block_size']} tokens = {model_args['block_size'] / tps:.1f} s of audio |", "",
              "## Data", "", f"`{local_name(dataset)}`: {data or 'no split summary recorded'}.", "",
              "## Training", ""]
    it, tokens = summary["iter_num"], summary["tokens_seen"]
    lines.append(f"- {it:,} iterations, {tokens:,} tokens seen ({tokens / tps / 3600:,.1f} h of audio)")
    if summary.get("init_from") not in (None, "scratch", "resume"):
        lines.append(f"- fine-tuned from `{base or local_name(summary['init_from'])}`")
    if "val_loss" in summary:
        lines.append(f"- val loss {summary['val_loss']:.4f} nats per token = **{summary['val_bps']:.0f} bits per "
                     "second** of audio (the raw codes take "
                     f"{math.log2(int(meta['codebook_size'])) * tps:.0f} bits/s)")
    if summary.get("val_loss_levels"):
        lines.append("- val loss per codec level: " + ", ".join(f"{k} {v:.3f}"
                                                                for k, v in summary["val_loss_levels"].items()))
    run = summary.get("config") or {}
    if run:
        per_iter = run.get("gradient_accumulation_steps", 0) * run.get("batch_size", 0) * run.get("block_size", 0)
        lines.append(f"- learning rate {run.get('learning_rate')}, dropout {run.get('dropout')}, {per_iter:,} tokens "
                     "per iteration; the whole config is in meta.json")
    lines.append("")
    if samples:
        lines += ["## Samples", "", f"Written by train.py at its eval of iteration {it:,} (unconditional):", ""]
        lines += [f'<audio controls src="samples/{os.path.basename(p)}"></audio>' for p in samples]
        lines.append("")
    lines += ["## Files", "",
              "- `model.safetensors`, `config.json`, `generation_config.json`: a transformers GPT-2 "
              "(`GPT2LMHeadModel`; `lm_head` is tied to the token embedding), which gpt2o's loader reads too",
              "- `meta.json`: the token layout and codec (what the tokens mean), the dataset summary and the "
              "training summary and config", ""]
    return "\n".join(lines)


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entries(folder: str) -> list[str]:
    """Every file, symbolic link and empty folder under folder, as relative paths (links are not followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = [d for d in dirs if d not in links]
        names = files + links + ([] if files or dirs or links or root == folder else ["."])
        found += [os.path.normpath(os.path.relpath(os.path.join(root, n), folder)) for n in names]
    return sorted(found)


def our_files(folder: str) -> dict[str, str] | None:
    """{relative path: sha256} of the files export.py wrote into folder (from its meta.json); None when folder is
    not an export of ours."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            mark = json.load(f).get("export") or {}
    except (OSError, ValueError, AttributeError):
        return None
    files = mark.get("files") if isinstance(mark, dict) and mark.get("by") == EXPORT_MARK else None
    return files if isinstance(files, dict) else None


def not_ours(folder: str, ours: dict[str, str]) -> list[str]:
    """What in folder export.py did not write as it is now: added files and folders, and edited files."""
    return [rel for rel in entries(folder) if rel != "meta.json" and not (
        rel in ours and os.path.isfile(os.path.join(folder, rel)) and not os.path.islink(os.path.join(folder, rel))
        and digest(os.path.join(folder, rel)) == ours[rel])]


def write_folder(out: str, fill, overwrite: bool = False) -> None:
    """Fill a temp folder beside `out`, then rename it into place: `out` is never half written. An earlier export
    of ours in `out` is replaced with overwrite=True: only the files it wrote; what was added or edited there since
    is moved into the new folder, or the export is refused naming it where the new one writes the same name. Any
    other non-empty folder, a file or a symbolic link is refused."""
    if os.path.islink(out):
        raise UserError(f"out {out}: is a symbolic link (to {os.readlink(out)}); pass the folder itself or a new "
                        "--out folder")
    out = os.path.abspath(out)
    foreign: list[str] = []
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise UserError(f"out {out}: exists and is not a folder; pass a new --out folder")
        if os.listdir(out):
            ours = our_files(out)
            if ours is None:
                raise UserError(f"out {out}: exists and is not an earlier export (its meta.json lists no files "
                                "written by export.py); pass a new --out folder")
            if not overwrite:
                raise UserError(f"out {out}: holds an earlier export; pass --overwrite=True to replace its files "
                                "(files you added there are kept), or a new --out folder")
            foreign = not_ours(out, ours)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(out) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; give it the permissions mkdir would
        fill(tmp)
        if not os.path.exists(out):
            os.rename(tmp, out)
            return
        new = set(entries(tmp))
        new_parents = {p for rel in new for p in parents(rel)}
        clash = [rel for rel in foreign if rel in new_parents or any(p in new for p in parents(rel))]
        if clash:
            raise UserError(f"out {out}: {', '.join(clash[:5])}{' ...' if len(clash) > 5 else ''} "
                            f"{'was' if len(clash) == 1 else 'were'} added or edited after the earlier export, "
                            "and the new one writes the same name; move them out of the folder and export again")
        for rel in foreign:  # what the user added comes along, unchanged
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            os.rename(os.path.join(out, rel), os.path.join(tmp, rel))
        old = tmp + ".old"
        os.rename(out, old)
        os.rename(tmp, out)
        remove_ours(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith(tmp + os.sep):
            # a file that could not be written (a full disk): named where it was to go, not by the temp folder
            raise OSError(e.errno, e.strerror, out + e.filename[len(tmp):]) from None
        raise


def parents(rel: str) -> list[str]:
    """rel and each folder above it: samples/a.wav -> [samples/a.wav, samples]."""
    out = [rel]
    while os.path.dirname(out[-1]):
        out.append(os.path.dirname(out[-1]))
    return out


def remove_ours(old: str) -> None:
    """The earlier export, once its foreign files have moved out: files, then the folders they leave empty."""
    for root, dirs, files in os.walk(old, topdown=False):
        for name in files:
            os.remove(os.path.join(root, name))
        os.rmdir(root)


def push(folder: str, repo_id: str, private: bool, message: str) -> str:
    """Upload export.py's files in the folder (not what the user added there) to a Hub model repo (created if
    missing); returns its URL. Any failure is one line."""
    from huggingface_hub import HfApi
    files = ["meta.json", *(our_files(folder) or {})]
    try:
        api = HfApi()
        url = api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message,
                          allow_patterns=files)
    except Exception as e:  # offline, no token, no permission: huggingface_hub raises many types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"push to the Hugging Face Hub failed ({type(e).__name__}: {first}); the folder {folder} "
                        f"is ready: once online and logged in (`hf auth login` or HF_TOKEN), run this command again "
                        f"or `hf upload {repo_id} {folder}`") from None
    return str(url)


def main() -> None:
    with user_errors():
        cfg = parse_config(ExportConfig, sys.argv[1:], __doc__)
    if cfg.push and not cfg.repo_id:
        raise UserError("push=True needs --repo_id=<user>/<name> (the Hub repo to upload to)")
    if cfg.repo_id and (cfg.repo_id.count("/") != 1 or not all(cfg.repo_id.split("/"))):
        raise UserError(f"repo_id={cfg.repo_id}: expected <user or organisation>/<name>")
    if not cfg.out or not cfg.license:
        raise UserError("out and license must not be empty: pass --out=<folder> and --license=<id, e.g. mit>")
    with user_errors():
        ckpt = load_consolidated(cfg.ckpt) if is_sharded(cfg.ckpt) else load_checkpoint(cfg.ckpt)
        meta = tokenizer_meta(ckpt, cfg.ckpt)
        layout = Layout.from_meta(meta)
        # meta.json tells every user of the folder what the ids mean: it must be the layout it names
        check_compatible(meta, layout.meta(), f"checkpoint {cfg.ckpt}: its meta", f"the {layout.name} layout")
    import safetensors.torch
    tensors, config, generation = export_files(ckpt["model"], ckpt["model_args"], meta)
    # the model's own count: the tied embedding once, its padding rows and the zero biases of bias=False left out
    n_params = sum(t.numel() for t in tensors.values())
    if not ckpt["model_args"]["bias"]:
        n_params -= sum(t.numel() for name, t in tensors.items() if name.endswith(".bias"))
    summary = training_summary(ckpt, cfg.ckpt)
    # the latest eval samples up to this checkpoint's iteration, when the run wrote any
    found = {i: p for i, p in list_samples(os.path.dirname(os.path.abspath(cfg.ckpt))).items()
             if i <= summary["iter_num"]}
    samples = found[max(found)] if found else []
    # the shard list is this machine's files; the rest says what the tokens mean and what the model saw
    meta_out = local_name({k: v for k, v in meta.items() if k not in ("shards", "skipped")})
    meta_out["training"] = local_name(summary)
    card = model_card(cfg, meta, ckpt["model_args"], n_params, summary, samples)

    def fill(folder: str) -> None:
        blob = safetensors.torch.save(tensors, metadata={"format": "pt"})
        atomic_write(os.path.join(folder, "model.safetensors"), lambda f: f.write(blob), size=len(blob))
        write_json(os.path.join(folder, "config.json"), config)
        write_json(os.path.join(folder, "generation_config.json"), generation)
        atomic_write(os.path.join(folder, "README.md"), lambda f: f.write(card), mode="w")
        for p in samples:
            with open(p, "rb") as f:
                wav = f.read()
            atomic_write(os.path.join(folder, "samples", os.path.basename(p)), lambda f: f.write(wav), size=len(wav))
        # written last: the list of what export.py wrote, which says the folder is ours to replace
        files = {rel: digest(os.path.join(folder, rel)) for rel in entries(folder) if rel != "meta.json"}
        write_json(os.path.join(folder, "meta.json"), {**meta_out, "export": {"by": EXPORT_MARK, "files": files}})

    write_folder(cfg.out, fill, cfg.overwrite)
    print(f"exported {cfg.ckpt} ({n_params / 1e6:.2f}M parameters, iteration {summary['iter_num']:,}) -> {cfg.out}: "
          "model.safetensors, config.json, generation_config.json, meta.json, README.md"
          + (f", {len(samples)} samples" if samples else ""), flush=True)
    if os.path.isabs(meta.get("codec", "")):
        print(f"note: the codec is a local folder ({meta['codec']}); users of this export pass their copy of it "
              "with generate.py --codec", flush=True)
    print(f"use it: python generate.py --ckpt={cfg.out}", flush=True)
    if cfg.push:
        url = push(cfg.out, cfg.repo_id, cfg.private, f"gpt2o export: iteration {summary['iter_num']}")
        print(f"pushed to {url}; use it: python generate.py --ckpt={cfg.repo_id}", flush=True)


if __name__ == "__main__":
    run_main(main, on_full_disk="the export is written to a temp folder first, so --out is as it was: free some "
                                "space and run it again")
