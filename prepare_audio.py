"""Audio files, or parquet files of audio or of SNAC codes -> SNAC tokens -> shards + meta.json, the dataset format
train.py reads (uint16 ids, or uint32 for a text encoding of more than 65k ids).

    python prepare_audio.py                                   # Sherlock Holmes chapters from the Hub -> data/sherlock/
    python prepare_audio.py --dataset=/path/to/my/audio --out_dir=data/mine
    python prepare_audio.py --dataset=owner/parquet-dataset --out_dir=data/big --max_hours=1000   # Hub parquet files
    python prepare_audio.py --dataset=/path/to/parquet --codes_column=snac24khz   # already tokenised: no codec runs
    python prepare_audio.py --codec=/path/to/snac_24khz       # offline: a folder with config.json + pytorch_model.bin
    python prepare_audio.py --dataset=/data/LJSpeech-1.1 --out_dir=data/ljspeech --val_files=100   # with transcripts
    python prepare_audio.py --text_corpus=sherlock.txt        # the book's text as text-only documents too
    torchrun --standalone --nproc_per_node=4 prepare_audio.py    # files split across 4 GPUs (or 4 CPU processes)
    python prepare_audio.py --help

Every audio file, and every row of a parquet file, becomes one document, in sorted path (then row) order (the layout
is at the top of tokenizer.py): with its transcript (name.txt, name.lab or name.normalized.txt beside an audio file,
LJSpeech's metadata.csv, or a parquet text column) a speech-from-text item [text][audio] or a transcription item
[audio][text] (--asr_fraction of them, chosen from (seed, name)), without one an audio document. Work is cached in
<out_dir>/.cache/ as it is done, one entry per audio file or per parquet row group, so a killed run, started again
with the same arguments, only does what is still missing; the shards and meta.json are built from that cache at the
end and come out byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from chats import read_chats
from codec import DEFAULT_CODEC, BadAudio, load_codec, read_audio, resampled_length, to_mono
from common import (Dist, UserError, atomic_write, hold_out_dir_lock, pick_device, run_main, user_errors,
                    write_json)
from config import parse_config
from dataset import shard_dtype
from sources import (Columns, Dataset, Item, Source, audio_extensions, codes_to_tokens, fetch, open_dataset,
                     pick_columns, read_schema, rows_to_items)
from tokenizer import DEFAULT_TEXT_ENCODING, Layout, load_text_encoding, voice_text

# -----------------------------------------------------------------------------
# config


@dataclass
class PrepareConfig:
    dataset: str = "eastwind/tiny-sherlock-audio"  # Hub dataset id, or a local folder of audio or .parquet files
    codec: str = DEFAULT_CODEC  # SNAC codec: Hub id, or a local folder with config.json + pytorch_model.bin
    out_dir: str = "data/sherlock"  # shards + meta.json go here; finished work is cached in out_dir/.cache/
    device: str = "auto"  # auto = cuda (cuda:LOCAL_RANK under torchrun), then mps, then cpu
    chunk_seconds: float = 60.0  # longer audio is encoded in chunks of this length (plus 0.77 s of context a side)
    batch_seconds: float = 0.0  # audio per codec call (equal-length chunks); 0 = 4 x chunk_seconds on CUDA, else 1 x
    workers: int = -1  # processes decoding audio, at most the CPU cores (shared by torchrun ranks); -1 = all, 0 = none
    val_files: int = 1  # the first N usable documents (files, or parquet rows) in order are the val split
    shard_tokens: int = 100_000_000  # tokens per shard file (2 bytes each); documents may span two shards
    max_hours: float = 0.0  # keep only the first documents, up to this many hours of audio (0 = all)
    max_items: int = 0  # keep only the first N usable documents (0 = all)
    codes_column: str = ""  # parquet SNAC codes: a flattened column (snac24khz) or one per level (snac_0,snac_1,snac_2)
    text_column: str = ""  # parquet transcripts (default: text, transcription, sentence, ... if present)
    keep_downloads: bool = False  # keep the Hub parquet files in out_dir/.downloads/ instead of deleting each when done
    strict: bool = False  # a bad file or row, or a missing/empty transcript in a transcribed set, stops the run
    text_encoding: str = "auto"  # tiktoken encoding (gpt2, cl100k_base, ...); none = audio only; auto = gpt2 if text
    text_field: str = "normalized"  # where both exist (LJSpeech, LibriTTS): "normalized" or "raw" transcripts
    asr_fraction: float = 0.5  # share of transcribed documents written as transcription items [audio][text]
    text_corpus: str = ""  # a UTF-8 text file; each paragraph (blank-line separated) is a text-only train document
    seed: int = 1337  # which transcribed documents are transcription items is a function of (seed, name)
    speaker_column: str = ""  # who speaks: a parquet column, or a metadata.csv field (its header name or 0-based index)
    clone_fraction: float = 0.0  # share of speech-from-text items of a speaker written as voice-cloning items


# -----------------------------------------------------------------------------
# transcripts and text

TRANSCRIPT_SUFFIXES = {"normalized": (".normalized.txt", ".txt", ".lab", ".original.txt"),
                       "raw": (".original.txt", ".txt", ".lab", ".normalized.txt")}


def clean_text(text: str) -> str:
    """One line: runs of whitespace (newlines included) become one space."""
    return " ".join(text.split())


def read_text_file(path: str) -> str:
    try:
        # utf-8-sig: a byte-order mark (as Windows editors save UTF-8) is not part of the first line's text or id
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"text file {path}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None


def find_transcripts(root: str, files: list[str], text_field: str) -> dict[str, str]:
    """Audio file -> its transcript, for the files that have one (empty ones included, as ""): a text file beside
    it with the same name (name.normalized.txt / name.original.txt as LibriTTS ships them, name.txt, name.lab), or
    a row `id|text|normalized text` of an LJSpeech metadata.csv in its folder or the folder above (wavs/<id>.wav)."""
    found: dict[str, str] = {}
    tables: dict[str, dict[str, str]] = {}  # folder -> {id: text} of its metadata.csv

    def table(folder: str) -> dict[str, str]:
        if folder not in tables:
            path, rows = os.path.join(root, folder, "metadata.csv"), {}
            if os.path.isfile(path):
                for line in read_text_file(path).splitlines():  # LJSpeech: no quoting, text may hold quotes
                    cols = line.split("|")
                    if len(cols) >= 2:
                        normalized = cols[2] if len(cols) > 2 and cols[2].strip() else cols[1]
                        rows[cols[0]] = normalized if text_field == "normalized" else cols[1]
            tables[folder] = rows
        return tables[folder]

    for rel in files:
        stem = rel.rsplit(".", 1)[0]
        folder, name = os.path.split(stem)
        for suffix in TRANSCRIPT_SUFFIXES[text_field]:
            if os.path.isfile(os.path.join(root, stem + suffix)):
                found[rel] = clean_text(read_text_file(os.path.join(root, stem + suffix)))
                break
        else:
            for where in (folder, os.path.dirname(folder)) if folder else ("",):
                if name in table(where):
                    found[rel] = clean_text(table(where)[name])
                    break
    return found


def find_speakers(root: str, files: list[str], speaker_column: str) -> dict[str, str]:
    """Audio file -> its speaker: with --speaker_column, that field of the metadata.csv row that holds it (named by
    the file's header row, or a 0-based index); else LibriTTS's folders, speaker/chapter/speaker_chapter_*.wav."""
    found: dict[str, str] = {}
    if not speaker_column:
        for rel in files:
            parts = rel.split("/")
            if len(parts) >= 3 and parts[-1].startswith(f"{parts[-3]}_{parts[-2]}_"):
                found[rel] = parts[-3]
        return found
    tables: dict[str, dict[str, str]] = {}  # folder -> {file stem: speaker} of its metadata.csv

    def table(folder: str) -> dict[str, str]:
        if folder not in tables:
            path, rows = os.path.join(root, folder, "metadata.csv"), {}
            lines = read_text_file(path).splitlines() if os.path.isfile(path) else []
            if lines:
                header = lines[0].split("|")
                if speaker_column in header:
                    index, lines = header.index(speaker_column), lines[1:]
                elif speaker_column.isdigit():
                    index = int(speaker_column)
                else:
                    raise UserError(f"--speaker_column={speaker_column}: {path} has no such header field (its first "
                                    f"row: {'|'.join(header)[:120]}); name a field of its header row, or give a "
                                    "0-based field index")
                for line in lines:
                    cols = line.split("|")
                    if len(cols) > index and cols[index].strip():
                        rows[os.path.splitext(os.path.basename(cols[0]))[0]] = " ".join(cols[index].split())
            tables[folder] = rows
        return tables[folder]

    for rel in files:
        folder, name = os.path.split(rel.rsplit(".", 1)[0])
        for where in (folder, os.path.dirname(folder)) if folder else ("",):
            if name in table(where):
                found[rel] = table(where)[name]
                break
    if not any(tables.values()):
        raise UserError(f"--speaker_column={speaker_column}: no metadata.csv with that field beside the audio files "
                        f"of {root}; for audio folders it names a field of LJSpeech-style metadata.csv rows")
    return found


def read_corpus(path: str) -> list[str]:
    """A text file -> its paragraphs (separated by blank lines), each on one line."""
    if not os.path.isfile(path):
        raise UserError(f"text_corpus {path}: not found; pass --text_corpus=<a UTF-8 text file> (or leave it empty)")
    paragraphs = [clean_text(p) for p in re.split(r"\n\s*\n", read_text_file(path))]
    return [p for p in paragraphs if p]


def transcription_first(seed: int, rel: str, asr_fraction: float, salt: str = "") -> bool:
    """Whether a transcribed file is a transcription item [audio][text] (else speech-from-text [text][audio]):
    a function of (seed, file name) alone, so reruns and any number of processes agree. salt: another draw of the
    same kind ("clone": whether a speech item of a speaker is a cloning item)."""
    h = hashlib.sha1(f"{seed}\0{rel}{salt and chr(0) + salt}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64 < asr_fraction


# -----------------------------------------------------------------------------
# work: groups of items (an audio file, or a parquet row group) -> cache entries


@dataclass
class Group:
    source: Source
    index: int  # row group in its parquet file (0 for an audio file)
    n_groups: int  # groups of the source: one entry each in the cache
    path: str  # its cache entry
    items: list[Item] | None  # None when its entry is cached already


def entry_path(folder: str, source: Source, index: int, kind: str) -> str:
    return os.path.join(folder, source.key + ("" if kind == "audio" else f"-{index:05d}") + ".npz")


def load_entry(path: str) -> dict | None:
    """A cached group: per item `status` (ok|bad|short), `reason`, `seconds`, `row`, `length` (tokens), `text`
    (None where missing), the ok items' tokens one after another, and the source's `n_groups`; None if missing."""
    try:
        with np.load(path, allow_pickle=False) as z:
            entry = {k: z[k] for k in ("tokens", "length", "seconds", "row", "status", "reason", "n_groups")}
            strings = {k: (z[k].tobytes(), z[f"{k}_len"]) for k in ("text", "speaker") if k in z}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing (not done yet) or damaged: redo
        return None
    if "text" not in strings:
        return None
    for key, (blob, lengths) in strings.items():
        ends = np.cumsum(np.maximum(lengths, 0))
        entry[key] = [None if n < 0 else blob[e - n:e].decode() for n, e in zip(lengths.tolist(), ends.tolist())]
    entry.setdefault("speaker", [None] * len(entry["status"]))
    return entry


def pack_strings(key: str, values: list[str | None]) -> dict[str, np.ndarray]:
    """Strings (None where missing) as two arrays: their UTF-8 bytes one after another, and each one's length."""
    blobs = [v.encode() if v is not None else b"" for v in values]
    return {key: np.frombuffer(b"".join(blobs), dtype=np.uint8),
            f"{key}_len": np.array([-1 if v is None else len(b) for v, b in zip(values, blobs)], dtype=np.int64)}


def save_entry(path: str, group: Group, results: list[dict]) -> dict:
    texts, speakers = [item.text for item in group.items], [item.speaker for item in group.items]
    arrays = {
        "tokens": np.concatenate([np.zeros(0, np.uint16)] + [r["tokens"] for r in results if "tokens" in r]),
        "length": np.array([len(r.get("tokens", ())) for r in results], dtype=np.int64),
        "seconds": np.array([r["seconds"] for r in results], dtype=np.float64),
        "row": np.array([item.row for item in group.items], dtype=np.int64),
        "status": np.array([r["status"] for r in results], dtype="<U5"),
        "reason": np.array([r["reason"] for r in results], dtype=str),
        "n_groups": np.array(group.n_groups),
        **pack_strings("text", texts),
        **(pack_strings("speaker", speakers) if any(who is not None for who in speakers) else {}),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return {**{k: v for k, v in arrays.items() if not k.startswith(("text", "speaker"))}, "text": texts,
            "speaker": speakers}


def cached_groups(folder: str, source: Source, kind: str) -> int | None:
    """How many groups a source has, if every one of them is cached already (then it need not be read at all)."""
    first = load_entry(entry_path(folder, source, 0, kind))
    if first is None:
        return None
    n = int(first["n_groups"])
    return n if all(os.path.exists(entry_path(folder, source, i, kind)) for i in range(1, n)) else None


def read_groups(ds: Dataset, sources: list[Source], folder: str, columns: Columns,
                cfg: PrepareConfig) -> Iterator[Group]:
    """The groups of these sources in order, with their items unless cached. A Hub parquet file is downloaded when
    its turn comes and deleted once its last row group has been read (memory: one row group; disk: one file)."""
    for source in sources:
        n = cached_groups(folder, source, ds.kind)
        if n is not None:
            yield from (Group(source, i, n, entry_path(folder, source, i, ds.kind), None) for i in range(n))
        elif ds.kind == "audio":
            yield Group(source, 0, 1, entry_path(folder, source, 0, ds.kind), [Item(-1, source.path)])
        elif ds.kind == "chat":
            yield Group(source, 0, 1, entry_path(folder, source, 0, ds.kind), chat_items(source))
        else:
            with user_errors():
                path = fetch(ds, source, cfg.out_dir)
            try:
                yield from parquet_groups(path, source, folder, columns)
            finally:
                if ds.repo and not cfg.keep_downloads and os.path.exists(path):
                    os.remove(path)


def chat_lines(source: Source) -> Iterator[tuple[int, list | None, str]]:
    try:
        yield from read_chats(source.path)
    except UnicodeDecodeError as e:
        raise UserError(f"{source.name}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except ValueError as e:  # an unknown shape, or a .json file that is not a list
        raise UserError(str(e).replace(source.path, source.name)) from None


def chat_items(source: Source) -> list[Item]:
    """A .jsonl file's items, one per audio turn of each conversation, in order; a line that cannot be read is one
    bad item (its row: the line number), so it is reported and skipped as a bad row is."""
    items = []
    for n, turns, error in chat_lines(source):
        if turns is None:
            items.append(Item(n, None, error=error))
        for turn in turns or ():
            if turn.audio is not None:
                kind, payload = turn.audio
                missing = kind == "file" and not os.path.isfile(payload)
                error = f"audio file {os.path.relpath(payload, os.path.dirname(source.path))}: not found" \
                    if missing else ""
                items.append(Item(n, None if missing else payload, error=error, codes=kind == "codes"))
    return items


def parquet_groups(path: str, source: Source, folder: str, columns: Columns) -> Iterator[Group]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        wanted = [c for c in (columns.audio, *columns.codes, columns.text, columns.speaker) if c]
        missing = [c for c in wanted if c not in pf.schema_arrow.names]
    except (pa.ArrowException, OSError, ValueError) as e:  # not parquet, damaged, empty
        yield Group(source, 0, 1, entry_path(folder, source, 0, "parquet"),
                    [Item(-1, None, error=f"cannot be read as parquet ({str(e).strip().splitlines()[0][:200]})")])
        return
    if missing:
        raise UserError(f"parquet file {source.name}: has no column {', '.join(missing)} (its columns: "
                        f"{', '.join(pf.schema_arrow.names)}); all files of a dataset need the same columns")
    n = max(1, pf.num_row_groups)  # a file with no row groups is one empty group, so its entry says it is done
    first = 0
    for i in range(n):
        rows = pf.metadata.row_group(i).num_rows if pf.num_row_groups else 0
        entry = entry_path(folder, source, i, "parquet")
        if os.path.exists(entry):
            yield Group(source, i, n, entry, None)
        else:
            try:
                table = pf.read_row_group(i, columns=wanted) if rows else None
                items = rows_to_items(table, columns, first) if rows else []
            except (pa.ArrowException, OSError, ValueError) as e:
                items = [Item(first, None, error=f"row group {i} ({rows} rows) cannot be read "
                                                 f"({str(e).strip().splitlines()[0][:200]})")]
            yield Group(source, i, n, entry, items)
        first += rows


# -----------------------------------------------------------------------------
# per item: decode + resample audio (in worker processes), or check pre-tokenised codes


def decode_audio(source: str | bytes, rate: int, frame_hop: int) -> dict:
    """An audio file (path or bytes) -> {"status": ok, "seconds", "audio": float32 mono at the codec rate}, or a
    bad/short status with the reason."""
    try:
        audio, file_rate = read_audio(source)
    except BadAudio as e:
        return {"status": "bad", "reason": str(e), "seconds": 0.0}
    seconds = len(audio) / file_rate
    if resampled_length(len(audio), file_rate, rate) < frame_hop:
        return {"status": "short", "seconds": seconds,
                "reason": f"shorter than one frame ({1000 * seconds:.1f} ms < {1000 * frame_hop / rate:.1f} ms)"}
    return {"status": "ok", "reason": "", "seconds": seconds, "audio": to_mono(audio, file_rate, rate)}


def decode_to_file(source: str | bytes, rate: int, frame_hop: int, path: str) -> dict:
    """decode_audio in a worker process, its audio handed back in a raw float32 file at `path` ("audio_file": (path,
    samples)) instead of through the pool's pipe: unpickling a long file's audio costs the main process about what a
    GPU takes to encode it, while reading it back from the page cache costs a tenth of that."""
    r = decode_audio(source, rate, frame_hop)
    if "audio" in r:
        audio = np.ascontiguousarray(r.pop("audio"), dtype=np.float32)
        try:
            with open(path, "wb") as f:
                f.write(memoryview(audio))
        except OSError as e:  # a full disk, say: name the file, so the main process says it in one line
            raise OSError(e.errno, e.strerror, path) from None
        r["audio_file"] = (path, len(audio))
    return r


def take_audio_file(r: dict) -> dict:
    """decode_to_file's result with its audio read back (and the file removed)."""
    if "audio_file" in r:
        path, n = r.pop("audio_file")
        r["audio"] = np.fromfile(path, dtype=np.float32, count=n)
        os.remove(path)
    return r


def check_codes(value, layout: Layout, seconds_per_frame: float) -> dict:
    try:
        tokens = codes_to_tokens(value, layout)
    except ValueError as e:
        return {"status": "bad", "reason": str(e), "seconds": 0.0}
    return {"status": "ok", "reason": "", "seconds": len(tokens) // layout.frame_size * seconds_per_frame,
            "tokens": tokens.astype(np.uint16)}


def run_ahead(pool, tasks, ahead: int) -> Iterator:
    """(tag, fn, args) -> (tag, fn(*args)) in order, up to `ahead` tasks running at once in the pool's processes
    (no pool: run here, one at a time). fn None: `args` is the result already."""
    window: deque = deque()
    for tag, fn, args in tasks:
        if fn is None or pool is None:
            window.append((tag, args if fn is None else fn(*args), False))
        else:
            window.append((tag, pool.apply_async(fn, args), True))
        while len(window) > ahead:
            tag, result, running = window.popleft()
            yield tag, result.get() if running else result
    for tag, result, running in window:
        yield tag, result.get() if running else result


def encode_groups(groups: Iterator[Group], tok, cfg: PrepareConfig, codes: bool, batch_seconds: float, pool,
                  ahead: int, clock: dict[str, float], scratch: str) -> Iterator[tuple[Group, dict]]:
    """(group, entry) in order: a cached entry as it is, any other group's items decoded (in the pool) and encoded,
    its entry written to the cache. The codec gets all chunks of a group at once, batched by length; batches never
    mix groups, so an entry does not depend on which run, or which rank, made it. On CUDA a group's codes are
    collected after the next group is launched, so the GPU is not left waiting on the host. clock[stage] adds up
    the seconds this process spent waiting for decoded audio ("decode"), launching the codec ("launch"), waiting
    for its codes and turning them into tokens ("codes back": on CUDA mostly the GPU's time) and writing cache
    entries ("write"). Workers hand decoded audio back in files in `scratch`. A group's codes come back through
    tok.codes_to_host, queued before the next group's codec calls: a .cpu() in finish() would wait for those too (a
    CUDA stream runs in order) and leave the GPU idle while the host finished this group."""
    rate, hop, layout = tok.sample_rate, tok.frame_hop, tok.layout

    def tasks():
        for i, g in enumerate(groups):
            for j, item in enumerate(g.items or ()):
                if item.error:
                    yield (g, item), None, {"status": "bad", "reason": item.error, "seconds": 0.0}
                elif codes or item.codes:  # cheap: done here
                    yield (g, item), None, check_codes(item.payload, layout, hop / rate)
                elif pool is None:
                    yield (g, item), decode_audio, (item.payload, rate, hop)
                else:
                    yield (g, item), decode_to_file, (item.payload, rate, hop, os.path.join(scratch, f"{i}.{j}.f32"))
            yield (g, None), None, None  # the group is complete (or cached)

    def finish(g: Group, results: list[dict], encoded: Callable[[], list[list[np.ndarray]]]) -> tuple[Group, dict]:
        t0 = time.perf_counter()
        it = iter(encoded())  # codes per level of each decoded item (waits for this group's codec calls only)
        for r in results:
            if "audio" in r:
                r["tokens"] = layout.codes_to_tokens(next(it)).astype(np.uint16)
                assert len(r["tokens"]) == tok.n_frames(len(r.pop("audio"))) * layout.frame_size, \
                    f"{g.source.name}: {len(r['tokens'])} tokens for {r['seconds']} s"
        t1 = time.perf_counter()
        entry = save_entry(g.path, g, results)
        clock["codes back"] += t1 - t0
        clock["write"] += time.perf_counter() - t1
        return g, entry

    pending = None  # a group whose codes are still on their way from the codec
    results: list[dict] = []
    done = run_ahead(pool, tasks(), ahead)
    while True:
        t0 = time.perf_counter()
        (g, item), out = next(done, ((None, None), None))
        clock["decode"] += time.perf_counter() - t0
        if g is None:
            break
        if item is not None:
            results.append(take_audio_file(out))
            continue
        launched = None
        if g.items is not None:  # every item of g is decoded: encode them (on CUDA: launch)
            t0 = time.perf_counter()
            audio = [r["audio"] for r in results if "audio" in r]
            encoded = tok.encode_many(audio, cfg.chunk_seconds, batch_seconds=batch_seconds)
            launched = (g, results, tok.codes_to_host(encoded))  # on CUDA: copies queued, nothing waited for
            results = []
            clock["launch"] += time.perf_counter() - t0
        if pending is not None:
            yield finish(*pending)
        pending = launched
        if g.items is None:
            entry = load_entry(g.path)
            assert entry is not None, f"{g.path}: cache entry vanished"
            yield g, entry
    if pending is not None:
        yield finish(*pending)


def item_name(source: Source, row: int) -> str:
    return source.name if row < 0 else f"{source.name} row {row}"


def report(group: Group, entry: dict, strict: bool) -> None:
    """One warning line per unusable file or row; with --strict a bad (not merely short) one is an error."""
    from tqdm import tqdm
    for status, reason, row in zip(entry["status"], entry["reason"], entry["row"]):
        if status == "bad" and strict:
            raise UserError(f"{item_name(group.source, int(row))}: {reason} (fix or remove it, or run without "
                            "--strict to skip it)")
        if status != "ok":
            tqdm.write(f"warning: {item_name(group.source, int(row))}: {reason}; skipped", file=sys.stderr)


# -----------------------------------------------------------------------------
# shards


def write_split(out_dir: str, split: str, docs, shard_tokens: int, masked: bool = False) -> list[dict]:
    """Concatenate documents (source name, id array with its BOUNDARY first[, its uint8 loss mask]) into
    {split}_000.bin, ... of shard_tokens tokens each, as raw little-endian ids of the documents' dtype (uint16 or
    uint32); masked: each shard's loss mask beside it in {split}_000.mask (one byte per token, 1 = the loss counts
    that target)."""
    shards: list[dict] = []
    parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    sources: list[str] = []
    filled = 0

    def flush() -> None:
        data = np.concatenate(parts)
        data = data.astype(data.dtype.newbyteorder("<"))  # raw little-endian, no header
        name = f"{split}_{len(shards):03d}.bin"
        atomic_write(os.path.join(out_dir, name), lambda f: f.write(data.tobytes()), size=data.nbytes)
        shards.append({"file": name, "split": split, "tokens": int(len(data)), "sources": list(sources)})
        if masked:
            mask = np.concatenate(mask_parts).astype(np.uint8)
            atomic_write(os.path.join(out_dir, name[:-4] + ".mask"), lambda f: f.write(mask.tobytes()),
                         size=mask.nbytes)
            shards[-1]["mask"] = name[:-4] + ".mask"

    for rel, doc, *mask in docs:
        pos = 0
        while pos < len(doc):
            take = min(len(doc) - pos, shard_tokens - filled)
            parts.append(doc[pos:pos + take])
            if masked:
                mask_parts.append(mask[0][pos:pos + take])
            if not sources or sources[-1] != rel:
                sources.append(rel)
            pos, filled = pos + take, filled + take
            if filled == shard_tokens:
                flush()
                parts, mask_parts, sources, filled = [], [], [], 0
    if filled:
        flush()
    return shards


def select(cfg: PrepareConfig, ds: Dataset, folder: str) -> tuple[list[tuple[Source, str, int]], list[dict], int]:
    """The documents to keep, as (source, cache entry, items kept from its start) in order, the skipped ones, and the
    number of usable ones: everything, or the prefix that --max_items / --max_hours allow (each rank stopped only
    past that prefix)."""
    limit = cfg.max_hours * 3600
    kept, skipped, count, total = [], [], 0, 0.0
    for source in ds.sources:
        i, n = 0, 1
        while i < n:
            path = entry_path(folder, source, i, ds.kind)
            entry = load_entry(path)
            assert entry is not None, f"{source.name}: group {i} is not cached after encoding"
            n = int(entry["n_groups"])
            for j, (status, seconds) in enumerate(zip(entry["status"], entry["seconds"])):
                if status == "ok" and limit and total + seconds > limit:
                    kept.append((source, path, j))
                    return kept, skipped, count
                if status == "bad" and cfg.strict:
                    raise UserError(f"{item_name(source, int(entry['row'][j]))}: {entry['reason'][j]} (fix or "
                                    "remove it, or run without --strict to skip it)")
                if status != "ok":
                    skipped.append({"file": source.name, **({"row": int(entry["row"][j])} if entry["row"][j] >= 0
                                                            else {}), "reason": str(entry["reason"][j])})
                    continue
                count, total = count + 1, total + seconds
                if count == cfg.max_items:
                    kept.append((source, path, j + 1))
                    return kept, skipped, count
            kept.append((source, path, len(entry["status"])))
            i += 1
    return kept, skipped, count


def assemble_chats(cfg: PrepareConfig, tok, layout: Layout, enc, ds: Dataset, folder: str) -> dict:
    """assemble() for conversations: each usable .jsonl line is one document (Layout.conversation) with its loss
    mask beside it; a line with a bad audio turn is skipped (it was warned about)."""
    skipped: list[dict] = []

    def conversations():  # (source name, ids, mask) of every usable conversation, in order
        for source in ds.sources:
            entry = load_entry(entry_path(folder, source, 0, ds.kind))
            assert entry is not None, f"{source.name}: not cached after encoding"
            ends, k = np.cumsum(entry["length"]), 0
            for n, turns, error in chat_lines(source):
                m = 1 if turns is None else sum(t.audio is not None for t in turns)
                bad = [j for j in range(k, k + m) if entry["status"][j] != "ok"]
                k += m
                if bad:
                    if collect:
                        skipped.append({"file": source.name, "row": n, "reason": str(entry["reason"][bad[0]])})
                    continue
                built, j = [], k - m
                for t in turns:
                    audio = None
                    if t.audio is not None:
                        audio = entry["tokens"][ends[j] - entry["length"][j]:ends[j]].astype(np.int64) + \
                            layout.audio_offset
                        j += 1
                    built.append((t.role, enc.encode_ordinary(t.text) if t.text else None, audio))
                yield (source.name, float(entry["seconds"][k - m:k].sum()), *layout.conversation(built))

    collect = True
    n_usable = sum(1 for _ in conversations())
    collect = False
    if not n_usable:
        raise UserError(f"dataset {cfg.dataset}: none of the conversations of its {len(ds.sources)} .jsonl files "
                        "could be used (see the warnings above)")
    if cfg.val_files and cfg.val_files >= n_usable:
        raise UserError(f"val_files={cfg.val_files}: the dataset has only {n_usable} usable conversations, so "
                        "nothing is left to train on; use a smaller --val_files (0 = no val split)")
    if os.path.exists(os.path.join(cfg.out_dir, "meta.json")):
        os.remove(os.path.join(cfg.out_dir, "meta.json"))  # the shards are about to change
    splits, shards = {}, []
    for split, start, stop in (("train", cfg.val_files, n_usable), ("val", 0, cfg.val_files)):
        stats = {"tokens": 0, "seconds": 0.0, "files": 0, "paired": 0, "audio_tokens": 0, "text_tokens": 0,
                 "assistant_tokens": 0}  # files: conversations

        def docs():
            for i, (name, seconds, ids, mask) in enumerate(conversations()):
                if start <= i < stop:
                    stats["tokens"] += len(ids)
                    stats["seconds"] += seconds
                    stats["files"] += 1
                    stats["text_tokens"] += int((ids < layout.text_vocab).sum())
                    stats["audio_tokens"] += int(((ids >= layout.audio_offset) & (ids < layout.boundary_id)).sum())
                    stats["assistant_tokens"] += int(mask.sum())
                    yield name, ids.astype(np.uint16), mask
        shards += write_split(cfg.out_dir, split, docs(), cfg.shard_tokens, masked=True)
        splits[split] = {**stats, "seconds": round(stats["seconds"], 3)}
    keep = {s["file"] for s in shards} | {s["mask"] for s in shards}
    for name in os.listdir(cfg.out_dir):  # shards of an earlier, bigger run
        if re.fullmatch(r"(train|val)_\d{3,}\.(bin|mask)", name) and name not in keep:
            os.remove(os.path.join(cfg.out_dir, name))
    meta = {**tok.meta(), **layout.meta(), "dtype": "uint16", "dataset": cfg.dataset, "shards": shards,
            "skipped": skipped, "splits": splits}
    write_json(os.path.join(cfg.out_dir, "meta.json"), meta)
    return meta


def assemble(cfg: PrepareConfig, tok, layout: Layout, enc, ds: Dataset, folder: str, text_column: str) -> dict:
    """Rank 0, after every rank is done: shards + meta.json, reading the cache one entry at a time. meta.json is
    written last, so a folder with a meta.json is always complete."""
    kept, skipped, n_usable = select(cfg, ds, folder)

    def documents(start: int, stop: int):  # (source, item name, tokens, seconds, transcript, speaker) of usable ones
        i = 0
        for source, path, upto in kept:
            entry = load_entry(path)
            ends = np.cumsum(entry["length"])
            for j in range(upto):
                if entry["status"][j] == "ok":
                    if start <= i < stop:
                        text = beside.get(source.name) if ds.kind == "audio" else entry["text"][j]
                        who = speakers.get(source.name) if ds.kind == "audio" else entry["speaker"][j]
                        yield (source, item_name(source, int(entry["row"][j])),
                               entry["tokens"][ends[j] - entry["length"][j]:ends[j]], entry["seconds"][j], text, who)
                    i += 1
                    if i == stop:
                        return

    what = "audio files" if ds.kind == "audio" else "parquet rows"
    if not n_usable and not skipped:  # nothing was warned about: there was nothing to read
        raise UserError(f"dataset {cfg.dataset}: its {len(ds.sources)} parquet file(s) hold no rows; point --dataset "
                        "at files with data")
    if not n_usable:
        raise UserError(f"dataset {cfg.dataset}: none of its {len(ds.sources)} {ds.kind} files could be used (see "
                        "the warnings above)" if ds.kind == "audio" else f"dataset {cfg.dataset}: none of the rows of "
                        f"its {len(ds.sources)} parquet files could be used (see the warnings above)")
    if cfg.val_files and cfg.val_files >= n_usable:
        raise UserError(f"val_files={cfg.val_files}: the dataset has only {n_usable} usable {what}, so nothing is "
                        "left to train on; use a smaller --val_files (0 = no val split)")
    # transcripts: beside the audio files (or in a metadata.csv), or a parquet column; a dataset with some of them
    # is a transcribed set, where a missing or empty one is a warning (an error with --strict)
    beside = find_transcripts(ds.root, [s.name for s in ds.sources], cfg.text_field) if ds.kind == "audio" else {}
    has_text = bool(beside or text_column)
    speakers = find_speakers(ds.root, [s.name for s in ds.sources], cfg.speaker_column) if ds.kind == "audio" else {}
    if not has_text:
        print("note: no transcripts found (name.txt, name.lab, name.normalized.txt beside the audio files, a "
              "metadata.csv, or a parquet text column): every document is audio only", flush=True)
    elif enc is None:
        print("note: text_encoding=none: the transcripts are not used (audio-only layout)", flush=True)
        has_text = False
    if has_text and cfg.strict:  # before anything is written
        for _, name, _, _, text, _ in documents(0, n_usable):
            if not (text or "").strip():
                raise UserError(f"{name}: {'empty' if text is not None else 'no'} transcript (expected a .txt, .lab "
                                "or .normalized.txt beside it, a metadata.csv row or a text cell), or run without "
                                "--strict to keep it as audio only")
    corpus = [enc.encode_ordinary(p) for p in read_corpus(cfg.text_corpus)] if cfg.text_corpus else []
    dtype = shard_dtype(layout.vocab_size)
    if os.path.exists(os.path.join(cfg.out_dir, "meta.json")):
        os.remove(os.path.join(cfg.out_dir, "meta.json"))  # the shards are about to change
    splits, shards, untranscribed, voices = {}, [], [], {}
    for split, start, stop in (("train", cfg.val_files, n_usable), ("val", 0, cfg.val_files)):
        stats = {"tokens": 0, "seconds": 0.0, "files": 0, "audio_tokens": 0, "text_tokens": 0, "paired": 0,
                 "transcription_items": 0, "text_documents": 0, "cloning_items": 0}
        last: dict[str, tuple[np.ndarray, list[int]]] = {}  # speaker -> their latest transcribed utterance here

        def docs():
            for source, name, tokens, seconds, text, who in documents(start, stop):
                ids = None
                if has_text:
                    ids = enc.encode_ordinary(clean_text(text)) if text and text.strip() else None
                    if ids is None:
                        reason = "empty transcript" if text is not None else "no transcript"
                        print(f"warning: {name}: {reason}; kept as audio only", file=sys.stderr, flush=True)
                        untranscribed.append({"file": name, "reason": reason})
                # the cache holds audio-only-layout ids (no text offset), so another text encoding reuses it
                audio = tokens.astype(np.int64) + layout.audio_offset
                asr = ids is not None and transcription_first(cfg.seed, name, cfg.asr_fraction)
                who = who if has_text and ids is not None else None  # voices ride in the text: transcribed items
                ref = last.get(who) if who is not None and not asr else None
                if ref is not None and transcription_first(cfg.seed, name, cfg.clone_fraction, salt="clone"):
                    doc = layout.clone_document(*ref, audio, ids)
                    stats["cloning_items"] += 1
                else:
                    spoken = enc.encode_ordinary(voice_text(clean_text(text), who)) if who and not asr else ids
                    doc = layout.document(audio=audio, text=spoken, text_first=not asr)
                if who is not None:
                    last[who] = (audio, ids)
                    voices[who] = voices.get(who, 0) + 1
                stats["tokens"] += len(doc)
                stats["seconds"] += float(seconds)
                stats["files"] += 1
                n_text = int((doc < layout.text_vocab).sum())  # a voice's name and a cloning reference's text too
                stats["audio_tokens"] += int((doc < layout.boundary_id).sum()) - n_text
                stats["text_tokens"] += n_text
                stats["paired"] += ids is not None
                stats["transcription_items"] += asr
                yield source.name, doc.astype(dtype)
            for ids in corpus if split == "train" else []:
                doc = layout.document(text=ids)
                stats["tokens"] += len(doc)
                stats["text_tokens"] += len(ids)
                stats["text_documents"] += 1
                yield cfg.text_corpus, doc.astype(dtype)
        shards += write_split(cfg.out_dir, split, docs(), cfg.shard_tokens)
        splits[split] = {**stats, "seconds": round(stats["seconds"], 3)}
    keep = {s["file"] for s in shards}
    for name in os.listdir(cfg.out_dir):  # shards of an earlier, bigger run
        if re.fullmatch(r"(train|val)_\d{3,}\.bin", name) and name not in keep:
            os.remove(os.path.join(cfg.out_dir, name))
    # the codec's meta, then the layout's (with text, it replaces the audio-only layout's keys)
    meta = {**tok.meta(), **layout.meta(), "dtype": dtype, "dataset": cfg.dataset,
            "dataset_hub": not os.path.isdir(cfg.dataset), "shards": shards,
            "skipped": skipped, "splits": splits}
    if layout.text_vocab:
        meta.update(text_eot=enc.eot_token, untranscribed=untranscribed, text_field=cfg.text_field,
                    asr_fraction=cfg.asr_fraction, seed=cfg.seed, text_corpus=cfg.text_corpus, voices=sorted(voices),
                    clone_fraction=cfg.clone_fraction)
    write_json(os.path.join(cfg.out_dir, "meta.json"), meta)
    return meta


# -----------------------------------------------------------------------------


def cache_folder(out_dir: str, tok, cfg: PrepareConfig, columns: Columns, runs_codec: bool) -> str:
    """One cache folder per codec (by its weights, not its name), encoding settings and columns read: a change never
    reuses stale work, and the same codec from the Hub or from a local copy shares the cache."""
    # the speaker column joins the key only when one is read: without it, caches keep their folder
    read = {k: v for k, v in dataclasses.asdict(columns).items() if k != "speaker" or v}
    settings = {**tok.meta(), "codec": None, "cache": 2, "columns": read,
                "chunk_seconds": cfg.chunk_seconds if runs_codec else None}
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(tok.codec.state_dict().items()) if runs_codec else ():
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return os.path.join(out_dir, ".cache", h.hexdigest()[:16])


def prepare_share(cfg: PrepareConfig, ds: Dataset, mine: list[Source], tok, columns: Columns, folder: str,
                  batch_seconds: float, pool, n_workers: int, master: bool) -> dict[str, float]:
    """Cache every group of these sources, in order. With --max_hours/--max_items it stops once its own share
    passes the limit, which is past the prefix that select() keeps. Returns encode_groups' clock."""
    from tqdm import tqdm
    t0, hours, count, total = time.time(), 0.0, 0, 0.0
    clock = {"decode": 0.0, "launch": 0.0, "codes back": 0.0, "write": 0.0}
    # decoded audio in flight between the workers and this process: its own folder (ranks share the cache), emptied
    # of what a killed run left
    scratch = os.path.join(folder, f"decoded.{os.environ.get('RANK', '0')}")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    groups = read_groups(ds, mine, folder, columns, cfg)
    work = encode_groups(groups, tok, cfg, bool(columns.codes), batch_seconds, pool, 2 * n_workers + 2, clock,
                         scratch)
    try:
        with tqdm(total=len(mine), unit="file", disable=not master, desc="prepare", dynamic_ncols=True) as bar:
            for group, entry in work:
                report(group, entry, cfg.strict)
                ok = entry["status"] == "ok"
                count, total = count + int(ok.sum()), total + float(entry["seconds"][ok].sum())
                if group.items is not None:
                    hours += float(entry["seconds"].sum()) / 3600
                bar.set_postfix_str(f"{count:,} docs | {audio_rate(hours * 3600 / max(time.time() - t0, 1e-9))}",
                                    refresh=False)
                bar.update(group.index == group.n_groups - 1)
                if (cfg.max_items and count >= cfg.max_items) or (cfg.max_hours and total > cfg.max_hours * 3600):
                    break
    finally:
        work.close()
        groups.close()  # deletes a download that was only partly read
        if pool is not None:
            pool.terminate()  # a worker may still be writing into scratch (when stopped early, or on an error)
        shutil.rmtree(scratch, ignore_errors=True)
    return clock


def audio_rate(seconds_per_second: float) -> str:
    """Audio prepared per second of wall time, in the unit that gives a readable number: audio-h/s, -min/s or -s/s."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds_per_second >= size:
            return f"{seconds_per_second / size:.3g} audio-{unit}/s"
    return f"{seconds_per_second:.3g} audio-s/s"


def start_workers(cfg: PrepareConfig, dist: Dist) -> tuple[object, int]:
    """The decoding processes, started first thing (a fork of a process with no threads and no GPU yet): as many
    as this rank's share of the CPU cores, or --workers, at most that many (more would only queue for the cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    n = share if cfg.workers < 0 else min(cfg.workers, share)
    if n < cfg.workers and dist.master:
        print(f"note: workers={cfg.workers}: capped at {n}, this process's share of the {cores} CPU cores",
              flush=True)
    if n == 0:
        return None, 0
    # fork on Linux: workers start in milliseconds; elsewhere spawn (macOS and Windows cannot fork safely)
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ctx.Pool(n), n


def main() -> None:
    with user_errors():
        cfg = parse_config(PrepareConfig, sys.argv[1:], __doc__)
    for key, ok, expected in (("shard_tokens", cfg.shard_tokens >= 1, "at least 1"),
                              ("val_files", cfg.val_files >= 0, "0 (no val split) or more"),
                              ("chunk_seconds", cfg.chunk_seconds > 0, "more than 0"),
                              ("batch_seconds", cfg.batch_seconds >= 0, "0 (auto) or more"),
                              ("max_hours", cfg.max_hours >= 0, "0 (all) or more"),
                              ("max_items", cfg.max_items >= 0, "0 (all) or more"),
                              ("out_dir", cfg.out_dir, "a folder for the shards"),
                              ("text_field", cfg.text_field in TRANSCRIPT_SUFFIXES, "'normalized' or 'raw'"),
                              ("asr_fraction", 0 <= cfg.asr_fraction <= 1, "a fraction in [0, 1]"),
                              ("clone_fraction", 0 <= cfg.clone_fraction <= 1, "a fraction in [0, 1]")):
        if not ok:
            raise UserError(f"{key}={getattr(cfg, key)!r}: must be {expected}")
    enc_hint = "; or pass --text_encoding=none for audio-only data (no transcripts, no text)"
    with user_errors(hint=enc_hint):
        enc = None if cfg.text_encoding in ("none", "", "auto") else load_text_encoding(cfg.text_encoding)
    if cfg.text_encoding in ("none", "") and cfg.text_corpus:
        raise UserError("text_corpus needs a text encoding; drop --text_encoding=none")
    if cfg.text_encoding in ("none", "") and cfg.speaker_column:  # a voice is a name in the text
        raise UserError("speaker_column needs a text encoding (voices ride in the text); drop --text_encoding=none")

    start = time.perf_counter()
    dist = Dist.from_env()  # torchrun: each rank prepares its share of the files
    if dist.master:  # one job per out_dir: a second one refuses, naming this one
        hold_out_dir_lock(cfg.out_dir)
    pool, n_workers = start_workers(cfg, dist)
    try:
        device = dist.init(pick_device(cfg.device))
        rank, world, master = dist.rank, dist.world_size, dist.master
        if master:
            print(f"config: {json.dumps(dataclasses.asdict(cfg))} | device {device} | {world} process(es), "
                  f"{n_workers} decoding worker(s) each", flush=True)
        # rank 0 lists/downloads the dataset and the codec first (or fails alone, with one line); the others then
        # find them cached
        if not master:
            dist.barrier()
        with user_errors():
            ds = open_dataset(cfg.dataset, exclude=cfg.out_dir)
        if not ds.sources:
            raise UserError(f"dataset {cfg.dataset}: no audio files or .parquet files found (searched {ds.root} "
                            f"recursively for .parquet, .{', .'.join(audio_extensions())}); point --dataset at a "
                            "folder of them")
        if ds.kind == "audio" and (cfg.codes_column or cfg.text_column):
            raise UserError(f"--codes_column/--text_column: dataset {cfg.dataset} has no .parquet files, only audio")
        if ds.kind == "audio" and cfg.speaker_column:  # a field that is not there stops before any work
            find_speakers(ds.root, [s.name for s in ds.sources], cfg.speaker_column)
        columns = Columns()
        if ds.kind == "parquet":
            with user_errors():
                tok = load_codec(cfg.codec, "cpu", weights=False)  # the layout, for finding codes columns
                columns = pick_columns(read_schema(ds), cfg.dataset, cfg.text_column, cfg.codes_column,
                                       tok.layout.n_levels, cfg.speaker_column)
        runs_codec = not columns.codes
        if runs_codec:
            with user_errors():
                tok = load_codec(cfg.codec, device)
        elif pool is not None:  # nothing to decode
            pool.terminate()
            pool, n_workers = None, 0
        if master:
            dist.barrier()
        if cfg.text_encoding == "auto":  # text ids only where there is text: a plain audio folder needs no BPE
            has_text = bool(cfg.text_corpus or columns.text or cfg.speaker_column or ds.kind == "chat" or (
                ds.kind == "audio" and find_transcripts(ds.root, [s.name for s in ds.sources], cfg.text_field)))
            with user_errors(hint=enc_hint):
                enc = load_text_encoding(DEFAULT_TEXT_ENCODING) if has_text else None
            if master:
                print("text_encoding=auto: " + (f"{enc.name} (the dataset has text)" if enc else
                                                "none (no transcripts, no text_corpus: the audio-only layout)"),
                      flush=True)
        # the cache holds audio-only-layout tokens (tok's); the shards the text+audio layout's
        if ds.kind == "chat" and enc is None:
            raise UserError(f"dataset {cfg.dataset}: conversations need a text encoding; drop --text_encoding=none")
        layout = Layout(tok.layout.vq_strides, tok.layout.codebook_size, *((enc.name, enc.n_vocab) if enc else ()),
                        chat=ds.kind == "chat")
        if master and ds.kind == "parquet":
            print(f"reading columns {', '.join(columns.codes) or columns.audio}"
                  f"{' (pre-tokenised SNAC codes: no codec runs)' if columns.codes else ''}", flush=True)
            if columns.text:
                print(f"transcripts from column '{columns.text}'", flush=True)
        # nothing but the lock is written before this point
        folder = cache_folder(cfg.out_dir, tok, cfg, columns, runs_codec)
        new_dirs = [d for d in (cfg.out_dir, os.path.join(cfg.out_dir, ".cache")) if not os.path.isdir(d)]
        os.makedirs(folder, exist_ok=True)

        # each rank does sources i % world == rank, in order, into the shared cache
        batch_seconds = cfg.batch_seconds or cfg.chunk_seconds * (4 if device.startswith("cuda") else 1)
        clock = {"start-up": time.perf_counter() - start}
        clock.update(prepare_share(cfg, ds, ds.sources[rank::world], tok, columns, folder, batch_seconds, pool,
                                   n_workers, master))
        dist.barrier()
        if master:
            try:
                t0 = time.perf_counter()
                meta = assemble_chats(cfg, tok, layout, enc, ds, folder) if ds.kind == "chat" else \
                    assemble(cfg, tok, layout, enc, ds, folder, columns.text)
                clock["shards"] = time.perf_counter() - t0
            except UserError:
                # nothing came of this run (no usable file, or --strict): leave no folder behind that it made
                for d in reversed(new_dirs):
                    shutil.rmtree(d, ignore_errors=True)
                raise
            split = " | ".join(f"{name}: {v['files']:,} docs, {v['seconds'] / 3600:.2f} h, {v['tokens']:,} tokens"
                               + (f" ({v['paired']:,} paired, {v['text_tokens']:,} text)" if v["text_tokens"] else "")
                               for name, v in meta["splits"].items())
            print(f"{split} | skipped {len(meta['skipped'])} | {len(meta['shards'])} shards -> "
                  f"{os.path.join(cfg.out_dir, 'meta.json')}", flush=True)
            # where the time went (rank 0): a GPU waiting on decoded audio wants more --workers; on CUDA, "codes
            # back" is mostly the GPU running the codec, "codec launches" the host queueing it
            total = time.perf_counter() - start
            print(f"time: {total:.1f} s = start-up {clock['start-up']:.1f} (workers, device, dataset, codec) + "
                  f"waiting for decoded audio {clock['decode']:.1f} ({n_workers} worker(s)) + codec launches "
                  f"{clock['launch']:.1f} + codes back {clock['codes back']:.1f} + cache writes "
                  f"{clock['write']:.1f} + shards {clock['shards']:.1f} + other {total - sum(clock.values()):.1f}",
                  flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    dist.close()


if __name__ == "__main__":
    run_main(main, on_full_disk="the work done so far is kept in out_dir/.cache (every file is written whole or not at "
                                "all): free some space and run the same command again to finish")
