"""Audio files -> SNAC tokens -> uint16 shards + meta.json, the dataset format train.py reads.

    python prepare_audio.py                                   # Sherlock Holmes chapters from the Hub -> data/sherlock/
    python prepare_audio.py --dataset=/path/to/my/audio --out_dir=data/mine
    python prepare_audio.py --codec=/path/to/snac_24khz       # offline: a folder with config.json + pytorch_model.bin
    torchrun --standalone --nproc_per_node=4 prepare_audio.py    # files split across 4 GPUs (or 4 CPU processes)
    python prepare_audio.py --help

Every source file becomes one document, [BOUNDARY] + its tokens, in sorted path order. The tokens of each file are
cached in <out_dir>/.cache/ as soon as it is encoded, so a killed run, started again with the same arguments, only
encodes the files still missing; the shards and meta.json are built from that cache at the end and come out
byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from common import Dist, UserError, atomic_write, parse_config, pick_device, run_main, user_errors, write_json
from tokenizer import DEFAULT_CODEC, BadAudio, load_codec, read_audio

# -----------------------------------------------------------------------------
# config


@dataclass
class PrepareConfig:
    dataset: str = "eastwind/tiny-sherlock-audio"  # Hub dataset id, or a local folder searched recursively for audio
    codec: str = DEFAULT_CODEC  # SNAC codec: Hub id, or a local folder with config.json + pytorch_model.bin
    out_dir: str = "data/sherlock"  # shards + meta.json go here; finished files are cached in out_dir/.cache/
    device: str = "auto"  # auto = cuda (cuda:LOCAL_RANK under torchrun), then mps, then cpu
    chunk_seconds: float = 60.0  # audio per codec call, our batch size: longer is faster on a GPU, memory grows with it
    val_files: int = 1  # the first N usable files in sorted order are the val split (Sherlock: chapter 01)
    shard_tokens: int = 100_000_000  # tokens per shard file (2 bytes each); documents may span two shards
    strict: bool = False  # an unreadable/corrupt/truncated file stops the run instead of being skipped with a warning


# extensions we look for; soundfile (libsndfile) decodes all of them, mp3 since libsndfile 1.1
AUDIO_EXTENSIONS = {"wav": "WAV", "wave": "WAV", "flac": "FLAC", "ogg": "OGG", "oga": "OGG", "opus": "OGG",
                    "mp3": "MP3", "aiff": "AIFF", "aif": "AIFF", "aifc": "AIFF", "au": "AU", "snd": "AU",
                    "caf": "CAF", "w64": "W64", "rf64": "RF64", "voc": "VOC"}


# -----------------------------------------------------------------------------
# finding and reading audio


def audio_extensions() -> list[str]:
    import soundfile as sf
    formats = sf.available_formats()
    return sorted(ext for ext, fmt in AUDIO_EXTENSIONS.items() if fmt in formats)


def resolve_dataset(dataset: str) -> str:
    """A local folder as is; a Hub dataset id is downloaded (or found in the Hugging Face cache) first."""
    if os.path.isdir(dataset):
        return dataset
    if os.path.exists(dataset):
        raise UserError(f"dataset {dataset}: is a file; pass a folder of audio files or a Hub dataset id")
    if dataset.startswith((".", "/", "~")) or dataset.count("/") != 1:
        raise UserError(f"dataset '{dataset}': no such folder, and not a Hub dataset id like "
                        "'eastwind/tiny-sherlock-audio'")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id=dataset, repo_type="dataset")
    except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
        raise UserError(f"dataset '{dataset}': cannot download it from the Hugging Face Hub ({type(e).__name__}). "
                        "Without internet, copy the audio files into a folder and pass --dataset=<that folder>"
                        ) from None


def find_audio(root: str, exclude: str) -> list[str]:
    """Audio files under root (hidden folders and `exclude` left out), as sorted relative posix paths."""
    extensions = set(audio_extensions())
    exclude = os.path.realpath(exclude)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) != exclude]
        for name in files:
            if name.rsplit(".", 1)[-1].lower() in extensions and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


# -----------------------------------------------------------------------------
# per-file token cache: one .npz per source file, written atomically, so finished work survives a kill


def cache_folder(out_dir: str, tok, cfg: PrepareConfig) -> str:
    """One cache folder per codec (by its weights, not its name) and encoding setting: a change never reuses stale
    tokens, and the same codec from the Hub or from a local copy shares the cache."""
    settings = {**tok.meta(), "codec": None, "chunk_seconds": cfg.chunk_seconds}
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(tok.codec.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return os.path.join(out_dir, ".cache", h.hexdigest()[:16])


def cache_path(folder: str, root: str, rel: str) -> str:
    st = os.stat(os.path.join(root, rel))  # a source file that changes gets a new entry
    key = hashlib.sha1(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return os.path.join(folder, key + ".npz")


def load_entry(path: str) -> dict | None:
    """A cached result: {"tokens": uint16 array, "seconds": float, "status": ok|bad|short, "reason": str}, or None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"tokens": z["tokens"], "seconds": float(z["seconds"]), "status": str(z["status"]),
                    "reason": str(z["reason"])}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing (not done yet) or damaged: redo
        return None


def encode_file(path: str, tok, cfg: PrepareConfig) -> dict:
    try:
        audio, rate = read_audio(path)
    except BadAudio as e:
        return {"tokens": np.zeros(0, np.uint16), "seconds": 0.0, "status": "bad", "reason": str(e)}
    seconds = len(audio) / rate
    if tok.resampled_length(len(audio), rate) < tok.frame_hop:
        frame_ms = 1000 * tok.frame_hop / tok.sample_rate
        return {"tokens": np.zeros(0, np.uint16), "seconds": seconds, "status": "short",
                "reason": f"shorter than one frame ({1000 * seconds:.1f} ms < {frame_ms:.1f} ms)"}
    tokens = tok.encode(audio, rate, chunk_seconds=cfg.chunk_seconds)
    assert len(tokens) == tok.n_frames(tok.resampled_length(len(audio), rate)) * tok.layout.frame_size, \
        f"{path}: {len(tokens)} tokens for {len(audio)} samples at {rate} Hz"
    return {"tokens": tokens.astype(np.uint16), "seconds": seconds, "status": "ok", "reason": ""}


def report(rel: str, entry: dict, strict: bool) -> None:
    """One warning line per unusable file; with --strict a bad (not merely short) file is an error."""
    from tqdm import tqdm
    if entry["status"] == "bad" and strict:
        raise UserError(f"audio file {rel}: {entry['reason']} (fix or remove it, or run without --strict to skip it)")
    if entry["status"] != "ok":
        tqdm.write(f"warning: {rel}: {entry['reason']}; skipped", file=sys.stderr)  # above the progress bar


# -----------------------------------------------------------------------------
# shards


def write_split(out_dir: str, split: str, docs, shard_tokens: int) -> list[dict]:
    """Concatenate documents (rel, uint16 array with its BOUNDARY first) into {split}_000.bin, ... of shard_tokens
    tokens each."""
    shards: list[dict] = []
    parts: list[np.ndarray] = []
    sources: list[str] = []
    filled = 0

    def flush() -> None:
        data = np.concatenate(parts).astype("<u2")  # raw little-endian uint16, no header
        name = f"{split}_{len(shards):03d}.bin"
        atomic_write(os.path.join(out_dir, name), lambda f: f.write(data.tobytes()))
        shards.append({"file": name, "split": split, "tokens": int(len(data)), "sources": list(sources)})

    for rel, doc in docs:
        pos = 0
        while pos < len(doc):
            take = min(len(doc) - pos, shard_tokens - filled)
            parts.append(doc[pos:pos + take])
            if not sources or sources[-1] != rel:
                sources.append(rel)
            pos, filled = pos + take, filled + take
            if filled == shard_tokens:
                flush()
                parts, sources, filled = [], [], 0
    if filled:
        flush()
    return shards


def assemble(cfg: PrepareConfig, tok, root: str, files: list[str], folder: str) -> dict:
    """Rank 0, after every file is cached: shards + meta.json. meta.json is written last, so a folder with a
    meta.json is always complete."""
    entries = {}
    for rel in files:
        entry = load_entry(cache_path(folder, root, rel))
        assert entry is not None, f"{rel}: no cached tokens after encoding"
        if entry["status"] == "bad" and cfg.strict:
            raise UserError(f"audio file {rel}: {entry['reason']} (fix or remove it, or run without --strict to "
                            "skip it)")
        entries[rel] = entry
    usable = [rel for rel in files if entries[rel]["status"] == "ok"]
    skipped = [{"file": rel, "reason": entries[rel]["reason"]} for rel in files if entries[rel]["status"] != "ok"]
    if not usable:
        raise UserError(f"dataset {cfg.dataset}: none of its {len(files)} audio files could be used (see the "
                        "warnings above)")
    if cfg.val_files and cfg.val_files >= len(usable):
        raise UserError(f"val_files={cfg.val_files}: the dataset has only {len(usable)} usable files, so nothing is "
                        "left to train on; use a smaller --val_files (0 = no val split)")
    if os.path.exists(os.path.join(cfg.out_dir, "meta.json")):
        os.remove(os.path.join(cfg.out_dir, "meta.json"))  # the shards are about to change
    boundary = np.array([tok.layout.boundary_id], dtype=np.uint16)
    splits, shards = {}, []
    for split, names in (("train", usable[cfg.val_files:]), ("val", usable[:cfg.val_files])):
        docs = ((rel, np.concatenate([boundary, entries[rel]["tokens"]])) for rel in names)
        shards += write_split(cfg.out_dir, split, docs, cfg.shard_tokens)
        splits[split] = {"tokens": sum(len(entries[r]["tokens"]) + 1 for r in names),
                         "seconds": round(sum(entries[r]["seconds"] for r in names), 3), "files": len(names)}
    keep = {s["file"] for s in shards}
    for name in os.listdir(cfg.out_dir):  # shards of an earlier, bigger run
        if re.fullmatch(r"(train|val)_\d{3,}\.bin", name) and name not in keep:
            os.remove(os.path.join(cfg.out_dir, name))
    meta = {**tok.meta(), "dtype": "uint16", "dataset": cfg.dataset, "shards": shards, "skipped": skipped,
            "splits": splits}
    write_json(os.path.join(cfg.out_dir, "meta.json"), meta)
    return meta


# -----------------------------------------------------------------------------


def main() -> None:
    cfg = parse_config(PrepareConfig, sys.argv[1:], __doc__)
    for key, ok, expected in (("shard_tokens", cfg.shard_tokens >= 1, "at least 1"),
                              ("val_files", cfg.val_files >= 0, "0 (no val split) or more"),
                              ("chunk_seconds", cfg.chunk_seconds > 0, "more than 0"),
                              ("out_dir", cfg.out_dir, "a folder for the shards")):
        if not ok:
            raise UserError(f"{key}={getattr(cfg, key)!r}: must be {expected}")
    from tqdm import tqdm

    dist = Dist.from_env()  # torchrun: each rank encodes its share of the files
    device = dist.init(pick_device(cfg.device))
    rank, world, master = dist.rank, dist.world_size, dist.master
    if master:
        print(f"prepare_audio: {json.dumps(dataclasses.asdict(cfg))} | device {device} | {world} process(es)",
              flush=True)
    # rank 0 downloads the dataset and codec first (or fails alone, with one line); the others then find them cached
    if not master:
        dist.barrier()
    root = resolve_dataset(cfg.dataset)
    files = find_audio(root, exclude=cfg.out_dir)
    if not files:
        raise UserError(f"dataset {cfg.dataset}: no audio files found (searched {root} recursively for "
                        f".{', .'.join(audio_extensions())}); point --dataset at a folder of audio files")
    with user_errors():
        tok = load_codec(cfg.codec, device)
    if master:
        dist.barrier()
    if tok.layout.vocab_size > 1 << 16:
        raise UserError(f"codec {cfg.codec}: vocab_size {tok.layout.vocab_size} does not fit the uint16 shards")
    folder = cache_folder(cfg.out_dir, tok, cfg)  # nothing is written before this point
    new_dirs = [d for d in (cfg.out_dir, os.path.join(cfg.out_dir, ".cache")) if not os.path.isdir(d)]
    os.makedirs(folder, exist_ok=True)

    # each rank encodes files i % world == rank into the shared cache
    mine = files[rank::world]
    t0, hours = time.time(), 0.0
    with tqdm(total=len(mine), unit="file", disable=not master, desc="encode", dynamic_ncols=True) as bar:
        for rel in mine:
            path = cache_path(folder, root, rel)
            entry = load_entry(path)
            if entry is None:  # not done in an earlier run
                entry = encode_file(os.path.join(root, rel), tok, cfg)
                atomic_write(path, lambda f: np.savez(f, **entry))
                hours += entry["seconds"] / 3600
            report(rel, entry, cfg.strict)
            bar.set_postfix_str(f"{hours / max(time.time() - t0, 1e-9):.3g} audio-h/s", refresh=False)
            bar.update(1)
    dist.barrier()
    if master:
        try:
            meta = assemble(cfg, tok, root, files, folder)
        except UserError:
            # nothing came of this run (no usable file, or --strict): leave no folder behind that it made
            for d in reversed(new_dirs):
                shutil.rmtree(d, ignore_errors=True)
            raise
        split = " | ".join(f"{name}: {v['files']} files, {v['seconds'] / 3600:.2f} h, {v['tokens']:,} tokens"
                           for name, v in meta["splits"].items())
        print(f"{split} | skipped {len(meta['skipped'])} | {len(meta['shards'])} shards -> "
              f"{os.path.join(cfg.out_dir, 'meta.json')}", flush=True)
    dist.close()


if __name__ == "__main__":
    run_main(main)
