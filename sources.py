"""Where prepare_audio.py's documents come from, and what parquet columns hold. A dataset is a folder of audio
files, a folder of parquet files (searched recursively), or a Hub dataset: one stored as parquet is listed here and
its files are downloaded one at a time when their turn comes, any other is downloaded whole. A parquet row holds an
audio file's bytes (the struct the `datasets` library writes) or SNAC codes (one flattened column, or one column
per level), and maybe a transcript.

    from sources import open_dataset, read_schema, pick_columns, rows_to_items
    ds = open_dataset("owner/name", exclude="data/out")     # Dataset(kind, sources in order, root, repo, revision)
    columns = pick_columns(read_schema(ds), ds.root, text_column="", codes_column="", n_levels=3)
    items = rows_to_items(row_group_table, columns, first=0)  # one Item per row: its audio bytes or codes, text

pyarrow reads one row group at a time, which resuming by row group needs, and hands the audio bytes over
untouched for soundfile to decode (README, "Why pyarrow, not `datasets`").
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from tokenizer import Layout

# extensions we look for; soundfile (libsndfile) decodes all of them, mp3 since libsndfile 1.1
AUDIO_EXTENSIONS = {"wav": "WAV", "wave": "WAV", "flac": "FLAC", "ogg": "OGG", "oga": "OGG", "opus": "OGG",
                    "mp3": "MP3", "aiff": "AIFF", "aif": "AIFF", "aifc": "AIFF", "au": "AU", "snd": "AU",
                    "caf": "CAF", "w64": "W64", "rf64": "RF64", "voc": "VOC"}
# parquet columns recognised without a flag, first match wins
TEXT_COLUMNS = ("text", "transcription", "transcript", "sentence", "normalized_text", "text_normalized", "raw_text")
CODES_COLUMNS = ("snac24khz", "snac_24khz", "snac32khz", "snac_32khz", "snac44khz", "snac_44khz", "snac_codes",
                 "snac", "codes", "audio_codes")  # flattened, 7 codes per frame (24 kHz) in depth-first order
LEVEL_PREFIXES = ("snac_", "codes_", "snac_l", "level_")  # one column per level: snac_0, snac_1, snac_2


# -----------------------------------------------------------------------------
# the dataset: sources (audio files or parquet files) in order, local or on the Hub


@dataclass(frozen=True)
class Source:
    name: str  # path relative to the dataset folder or Hub repo, as messages and meta.json show it
    key: str  # cache identity: a changed file gets new entries
    path: str  # the local file; for a Hub parquet file its path in the repo, downloaded when its turn comes


@dataclass
class Dataset:
    kind: str  # "audio" (a file is a document), "parquet" (a row is one) or "chat" (a .jsonl line is one)
    sources: list[Source]
    root: str  # the local folder searched, or the Hub repo id
    repo: str = ""  # Hub dataset id when parquet files are downloaded one at a time
    revision: str = ""  # the commit they are read at


def audio_extensions() -> list[str]:
    import soundfile as sf
    formats = sf.available_formats()
    return sorted(ext for ext, fmt in AUDIO_EXTENSIONS.items() if fmt in formats)


def find_files(root: str, exclude: str, extensions: set[str]) -> list[str]:
    """Files with these extensions under root (hidden folders and `exclude` left out), as sorted relative posix
    paths."""
    exclude = os.path.realpath(exclude)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) != exclude]
        for name in files:
            if name.rsplit(".", 1)[-1].lower() in extensions and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def local_dataset(root: str, exclude: str) -> Dataset:
    """A folder of .parquet files (searched recursively), else a folder of audio files."""
    def source(rel: str) -> Source:
        st = os.stat(os.path.join(root, rel))  # a source file that changes gets new cache entries
        key = hashlib.sha1(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
        return Source(rel, key, os.path.join(root, rel))

    parquet = find_files(root, exclude, {"parquet"})
    if parquet and _chat_file(os.path.join(root, parquet[0])):
        return Dataset("chat", [source(rel) for rel in parquet], root)
    if parquet:
        return Dataset("parquet", [source(rel) for rel in parquet], root)
    chats = [rel for rel in find_files(root, exclude, {"jsonl", "json"})  # audio files beside them (chats.py)
             if rel.endswith(".jsonl") or _chat_file(os.path.join(root, rel))]
    if chats:
        return Dataset("chat", [source(rel) for rel in chats], root)
    return Dataset("audio", [source(rel) for rel in find_files(root, exclude, set(audio_extensions()))], root)


def _chat_file(path: str) -> bool:
    from chats import chat_shape
    try:
        return bool(chat_shape(path))
    except (ValueError, OSError):
        return False


def open_dataset(dataset: str, exclude: str) -> Dataset:
    """A local folder as is. A Hub dataset stored as parquet is listed here and its files are downloaded one at a
    time later; any other Hub dataset is downloaded whole (or found in the Hugging Face cache) first."""
    if os.path.isdir(dataset):
        return local_dataset(dataset, exclude)
    if os.path.exists(dataset):
        raise ValueError(f"dataset {dataset}: is a file; pass a folder of audio or .parquet files, or a Hub dataset id")
    if dataset.startswith((".", "/", "~")) or dataset.count("/") != 1:
        raise ValueError(f"dataset '{dataset}': no such folder, and not a Hub dataset id like "
                         "'eastwind/tiny-sherlock-audio'")
    from huggingface_hub import HfApi, snapshot_download
    try:
        info = HfApi().dataset_info(dataset, files_metadata=True)
        parquet = sorted((s for s in info.siblings if s.rfilename.endswith(".parquet")), key=lambda s: s.rfilename)
        if parquet:
            return Dataset("parquet", [Source(s.rfilename, hashlib.sha1(
                f"{dataset}\0{s.rfilename}\0{s.blob_id}".encode()).hexdigest()[:24], s.rfilename) for s in parquet],
                dataset, repo=dataset, revision=info.sha)
    except Exception:  # offline, unknown repo, auth: a snapshot in the local cache may still do, see below
        pass
    try:
        root = snapshot_download(repo_id=dataset, repo_type="dataset")
    except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
        raise ValueError(f"dataset '{dataset}': cannot download it from the Hugging Face Hub ({type(e).__name__}). "
                         "Without internet, copy its audio or .parquet files into a folder and pass "
                         "--dataset=<that folder>") from None
    return local_dataset(root, exclude)


def fetch(ds: Dataset, source: Source, out_dir: str) -> str:
    """The local path of a source: a Hub parquet file is downloaded into out_dir/.downloads/ first."""
    if not ds.repo:
        return source.path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(ds.repo, source.path, repo_type="dataset", revision=ds.revision,
                               local_dir=os.path.join(out_dir, ".downloads"))
    except Exception as e:  # network, disk, auth: huggingface_hub raises many types
        raise ValueError(f"dataset '{ds.repo}': cannot download {source.path} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); run again to resume, "
                         "or download the .parquet files yourself and pass --dataset=<that folder>") from None


# -----------------------------------------------------------------------------
# parquet columns: audio (a struct with bytes, as the datasets library writes it) or SNAC codes, and transcripts


@dataclass(frozen=True)
class Columns:
    audio: str = ""  # struct<bytes, path> or binary: the bytes of an audio file
    codes: tuple[str, ...] = ()  # one flattened column, or one per level (coarse first)
    text: str = ""  # transcripts, carried along (not used by the audio-only layout)
    speaker: str = ""  # who speaks each row (--speaker_column): strings or integers


def read_schema(ds: Dataset):
    """The arrow schema of the first parquet file that can be read (a Hub file: only its footer is fetched)."""
    import pyarrow.parquet as pq
    for source in ds.sources:
        try:
            if not ds.repo:
                return pq.read_schema(source.path)
            from huggingface_hub import HfFileSystem
            with HfFileSystem().open(f"datasets/{ds.repo}@{ds.revision}/{source.path}", "rb") as f:
                return pq.read_schema(f)
        except (OSError, ValueError):  # pyarrow's errors derive from these; an unreadable file is reported later
            continue
    raise ValueError(f"dataset {ds.root}: none of its {len(ds.sources)} .parquet files can be read")


def pick_columns(schema, dataset: str, text_column: str, codes_column: str, n_levels: int,
                 speaker_column: str = "") -> Columns:
    """The columns to read, from the flags or else by well-known names and types."""
    import dataclasses

    import pyarrow as pa
    names = schema.names
    where = f"dataset {dataset}: columns {', '.join(names)}"
    if speaker_column:
        if speaker_column not in names:
            raise ValueError(f"--speaker_column={speaker_column}: no such column ({where})")
        t = schema.field(speaker_column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
            raise ValueError(f"--speaker_column={speaker_column}: holds {t}, not speaker names or ids ({where}); "
                             "name a column of strings or integers")
        columns = pick_columns(schema, dataset, text_column, codes_column, n_levels)
        return dataclasses.replace(columns, speaker=speaker_column)

    def check(column: str, flag: str) -> str:
        if column not in names:
            raise ValueError(f"{flag}={column}: no such column ({where})")
        return column

    def is_text(column: str) -> bool:  # a column of nulls only is text that is missing everywhere
        t = schema.field(column).type
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
    known = [c for c in TEXT_COLUMNS if c in names]
    text = check(text_column, "--text_column") if text_column else next((c for c in known if is_text(c)), "")
    wrong = text if text and not is_text(text) else "" if text else next(iter(known), "")
    if wrong:  # a transcript column of numbers is a mistake to say, not a column to skip or to read as text
        raise ValueError(f"{f'--text_column={wrong}' if text_column else f'column {wrong!r}'}: holds "
                         f"{schema.field(wrong).type}, not text ({where}); name the transcript column with "
                         "--text_column=<column of strings>")
    if codes_column:
        codes = tuple(check(c.strip(), "--codes_column") for c in codes_column.split(","))
        if len(codes) not in (1, n_levels):
            raise ValueError(f"--codes_column={codes_column}: give one column of flattened codes or one column "
                             f"per level ({n_levels} for this codec, coarse first), comma-separated")
        return Columns(codes=codes, text=text)
    flat = next((c for c in CODES_COLUMNS if c in names), "")
    if flat:
        return Columns(codes=(flat,), text=text)
    for prefix in LEVEL_PREFIXES:
        if all(f"{prefix}{level}" in names for level in range(n_levels)):
            return Columns(codes=tuple(f"{prefix}{level}" for level in range(n_levels)), text=text)

    def is_audio(column: str) -> bool:
        t = schema.field(column).type
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 or pa.types.is_binary(t) or \
            pa.types.is_large_binary(t)
    audio = next((c for c in ["audio"] + names if c in names and is_audio(c)), "")
    if not audio:
        raise ValueError(f"{where}: found no audio column (a struct with 'bytes', as the datasets library writes "
                         f"audio) and no SNAC codes column; name it with --codes_column=snac24khz (flattened) or "
                         f"--codes_column=snac_0,snac_1,snac_2 (one per level)")
    return Columns(audio=audio, text=text)


# -----------------------------------------------------------------------------
# parquet rows -> items, and SNAC codes -> tokens


@dataclass
class Item:
    row: int  # row in its parquet file; -1 for an audio file
    payload: object  # an audio file's path or bytes, or a row's codes (a list, a string, or a tuple of levels)
    text: str | None = None  # its transcript, if the dataset has them
    error: str = ""  # why it cannot be used, known before decoding
    speaker: str | None = None  # who speaks it, if the dataset says (a speaker column)
    codes: bool = False  # the payload is SNAC codes (a conversation's turn may hold codes among audio files)


def rows_to_items(table, columns: Columns, first: int) -> list[Item]:
    texts = table.column(columns.text).to_pylist() if columns.text else [None] * table.num_rows
    speakers = [None if v is None or not str(v).strip() else " ".join(str(v).split())
                for v in table.column(columns.speaker).to_pylist()] if columns.speaker else [None] * table.num_rows
    if columns.codes:
        values = [table.column(c).to_pylist() for c in columns.codes]
        payloads = values[0] if len(values) == 1 else list(zip(*values))
        return [Item(first + j, p, t, speaker=who) for j, (p, t, who) in enumerate(zip(payloads, texts, speakers))]
    items = []
    for j, (cell, text, who) in enumerate(zip(table.column(columns.audio).to_pylist(), texts, speakers)):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        error = "" if data else "no audio bytes in the row" + (
            f" (only a path, {cell.get('path')!r}, which is not looked up)" if isinstance(cell, dict) and
            cell.get("path") else "")
        items.append(Item(first + j, data, text, error, who))
    return items


def _integers(value) -> np.ndarray:
    """A list of codes -> int64 (n,); a float that is not a whole number is a ValueError (int64 would truncate it)."""
    a = np.asarray(value)
    if a.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
        if len(bad):
            raise ValueError(f"code {a.reshape(-1)[bad[0]]} at position {bad[0]} is not an integer")
    return a.astype(np.int64).reshape(-1)


def codes_to_tokens(value, layout: Layout) -> np.ndarray:
    """A row's SNAC codes -> token ids of the layout. `value`: flattened codes, 7 per frame in depth-first order
    (for 24 kHz), as a list of ints or a space-separated string; or a tuple of per-level lists, coarse first.
    Codes are 0..codebook_size-1 (ids already offset by level, as in our layout, are accepted too).
    Raises ValueError(reason)."""
    cb, fs = layout.codebook_size, layout.frame_size
    if value is None or isinstance(value, tuple) and any(v is None for v in value):
        raise ValueError("no codes (null)")
    try:
        if isinstance(value, tuple):
            levels = [_integers(v) for v in value]
        elif isinstance(value, str):
            levels = [np.array(value.split(), dtype=np.int64)]
        else:
            levels = [_integers(value)]
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(str(e) if str(e).startswith("code ") else "codes are not integers" +
                         (" separated by spaces" if isinstance(value, str) else "")) from None
    if not len(levels[0]):
        raise ValueError("no codes (empty)")
    flat = levels[0]
    if len(levels) == 1 and len(flat) % fs == 0 and flat.max() >= cb:  # maybe ids offset by level, as in our layout
        lo = layout.frame_levels * cb
        frames = flat.reshape(-1, fs)  # (n_frames, frame_size)
        if ((frames >= lo) & (frames < lo + cb)).all():
            return flat
    for level, c in enumerate(levels):
        if c.min() < 0 or c.max() >= cb:
            bad = int(np.flatnonzero((c < 0) | (c >= cb))[0])
            raise ValueError(f"code {int(c[bad])} at position {bad}{f' of level {level}' if len(levels) > 1 else ''}"
                             f" is outside 0..{cb - 1}")
    if len(levels) > 1:
        n_frames = len(levels[0])
        for level, (c, k) in enumerate(zip(levels, layout.codes_per_frame)):
            if len(c) != n_frames * k:
                raise ValueError(f"level {level} has {len(c)} codes, expected {n_frames * k} ({k} per frame for the "
                                 f"{n_frames} frames of level 0)")
        return layout.codes_to_tokens(levels)
    if len(flat) % fs:
        raise ValueError(f"{len(flat)} codes is not a whole number of {fs}-code frames")
    return (flat.reshape(-1, fs) + layout.frame_levels * layout.codebook_size).reshape(-1)  # (n_frames, fs) + offsets
