"""prepare_audio.py on folders of parquet files written here with pyarrow, in the shapes Hub datasets use: an audio
struct column (bytes + path) with transcripts, and pre-tokenised SNAC codes (flattened lists, space-separated strings,
one column per level), with broken rows and files among them. A local folder goes through the same code as a Hub
dataset after its download step."""
import filecmp
import glob
import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import synth_audio
from prepare_audio import load_entry
from test_prepare import ENV, assert_same_output, kill_after_cache_entries, run_prepare
from codec import read_audio
from tokenizer import Layout

LAYOUT = Layout((4, 2, 1), 4096)
AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# audio rows of the first file: (seconds, rate, channels, format, transcript); None = corrupt bytes
ROWS_A = [(0.6, 24000, 1, "WAV", "first"), (0.5, 44100, 2, "FLAC", "second"), None,
          (0.4, 16000, 1, "OGG", None), (0.3, 22050, 1, "WAV", "fifth")]
ROWS_B = [(0.4, 24000, 1, "FLAC", "sixth"), (0.4, 48000, 2, "WAV", "seventh")]
A, B = "data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet"
EMPTY, DAMAGED = "data/train-00002-of-00003.parquet", "data/zz-damaged.parquet"


def audio_bytes(seconds, rate, channels, fmt, seed):
    buf = io.BytesIO()
    sf.write(buf, synth_audio(seconds, rate, channels, seed=seed), rate, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def audio_parquet(tmp_path_factory):
    """Two parquet files of audio rows (one corrupt), an empty one (no rows) and a damaged one (0 bytes)."""
    d = tmp_path_factory.mktemp("hub_audio")
    (d / "data").mkdir()
    for name, rows, seed in ((A, ROWS_A, 0), (B, ROWS_B, 10)):
        cells, texts = [], []
        for i, row in enumerate(rows):
            data = b"RIFF" + np.random.default_rng(i).bytes(500) if row is None else audio_bytes(*row[:4], seed + i)
            cells.append({"bytes": data, "path": f"clip_{seed + i}.x"})
            texts.append("broken" if row is None else row[4])
        table = pa.table({"audio": pa.array(cells, type=AUDIO_TYPE), "text": texts, "id": list(range(len(rows)))})
        pq.write_table(table, d / name, row_group_size=1)  # tiny row groups: one cache entry per row
    pq.write_table(table.slice(0, 0), d / EMPTY)
    (d / DAMAGED).write_bytes(b"")
    return str(d)


@pytest.fixture(scope="module")
def audio_prepared(audio_parquet, codec_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared_parquet"))
    args = [f"--codec={codec_dir}", f"--dataset={audio_parquet}", f"--out_dir={out}",
            "--device=cpu", "--text_encoding=none",
            "--shard_tokens=150"]
    r = run_prepare(*args)
    assert r.returncode == 0, r.stderr
    return out, args, r


def stream(out, split):
    meta = json.load(open(os.path.join(out, "meta.json")))
    shards = [s for s in meta["shards"] if s["split"] == split]
    return np.concatenate([np.fromfile(os.path.join(out, s["file"]), dtype="<u2") for s in shards]).astype(np.int64)


def documents(out):
    """The documents of val then train, each without its BOUNDARY."""
    docs = []
    for split in ("val", "train"):
        s = stream(out, split)
        starts = list(np.flatnonzero(s == LAYOUT.boundary_id)) + [len(s)]
        docs += [s[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]
    return docs


def test_audio_rows_with_transcripts(audio_prepared, audio_parquet, tok):
    out, _, r = audio_prepared
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["dataset"] == audio_parquet and {k: meta[k] for k in tok.meta()} == tok.meta()
    # every usable row is one document, in file then row order; each is the codec's own encoding of the row's audio
    table = {name: pq.read_table(os.path.join(audio_parquet, name)).to_pylist() for name in (A, B)}
    rows = [(A, i) for i, row in enumerate(ROWS_A) if row] + [(B, i) for i in range(len(ROWS_B))]
    docs = documents(out)
    assert len(docs) == len(rows) == meta["splits"]["val"]["files"] + meta["splits"]["train"]["files"]
    for (name, i), doc in zip(rows, docs):
        audio, rate = read_audio(table[name][i]["audio"]["bytes"])
        assert np.array_equal(doc, tok.encode(audio, rate)), (name, i)
    assert {src for s in meta["shards"] for src in s["sources"]} == {A, B}  # the parquet files, not their rows
    # the corrupt row and the damaged file are skipped with one warning each; the empty file is simply empty
    skipped = {(s["file"], s.get("row")): s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {(A, 2), (DAMAGED, None)}
    assert skipped[A, 2].startswith("cannot be decoded") and "cannot be read as parquet" in skipped[DAMAGED, None]
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2 and any(f"warning: {A} row 2: cannot be decoded" in w for w in warnings)
    assert any(f"warning: {DAMAGED}: cannot be read as parquet" in w for w in warnings)
    # transcripts: detected, announced in one note, and carried in the cache with their rows
    # (tests/test_text.py puts them into the text+audio layout; these runs write the audio-only one)
    assert "reading columns audio" in r.stdout and r.stdout.count("transcripts from column 'text'") == 1
    carried = set()
    for path in glob.glob(os.path.join(out, ".cache", "*", "*.npz")):
        entry = load_entry(path)
        carried |= {(int(row), text) for row, text in zip(entry["row"], entry["text"]) if row >= 0}
    assert carried == {(i, "broken" if row is None else row[4]) for i, row in enumerate(ROWS_A)} | \
        {(i, row[4]) for i, row in enumerate(ROWS_B)}


@pytest.mark.slow
def test_killed_run_resumes_at_the_row_group(audio_prepared, tmp_path):
    ref, args, _ = audio_prepared
    out = str(tmp_path / "out")
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={out}"]
    kill_after_cache_entries(args, out)
    before = {path: os.stat(path).st_mtime_ns for path in glob.glob(os.path.join(out, ".cache", "*", "*.npz"))}
    assert 2 <= len(before) < 9  # 5 + 2 row groups, the empty file and the damaged one
    r = run_prepare(*args, "--workers=0")  # decoding in the main process this time: the same output
    assert r.returncode == 0, r.stderr
    assert_same_output(ref, out)
    assert all(os.stat(path).st_mtime_ns == t for path, t in before.items())  # finished row groups were not redone


# --- pre-tokenised codes ----------------------------------------------------------------------------------------

def random_levels(rng, n_frames):
    return [rng.integers(0, 4096, n_frames * k) for k in (1, 2, 4)]


def depth_first(levels):
    """Flattened raw codes, 7 per frame, written out by hand: L0[i], L1[2i], L2[4i], L2[4i+1], L1[2i+1], ..."""
    l0, l1, l2 = levels
    return [int(c) for i in range(len(l0))
            for c in (l0[i], l1[2 * i], l2[4 * i], l2[4 * i + 1], l1[2 * i + 1], l2[4 * i + 2], l2[4 * i + 3])]


# rows per file; "bad" rows are broken in each shape's own way
CODE_ROWS = [[7, 3, "short", 12, 30], [2, "range", 9], [25, 4, "null", 11]]
BAD_REASONS = {"short": "not a whole number of 7-code frames", "range": "outside 0..4095", "null": "no codes"}


@pytest.fixture(scope="module")
def code_rows():
    rng = np.random.default_rng(0)
    return [[random_levels(rng, n) if isinstance(n, int) else n for n in rows] for rows in CODE_ROWS]


def write_codes(folder, rows, shape):
    """The same rows in one shape: 'lists' (snac24khz, lists of ints), 'strings' (space-separated, under a name only
    --codes_column finds) or 'levels' (snac_0, snac_1, snac_2)."""
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    for f, file_rows in enumerate(rows):
        flat, levels = [], [[], [], []]
        for row in file_rows:
            lv = [list(map(int, c)) for c in (row if isinstance(row, list) else random_levels(rng, 2))]
            codes = depth_first(lv)
            if row == "short":
                codes, lv[2] = codes[:-1], lv[2][:-1]
            if row == "range":
                codes[9], lv[1][1] = 4096, 4096
            if row == "null":
                codes, lv = None, [None, None, None]
            flat.append(codes)
            for level in range(3):
                levels[level].append(lv[level])
        texts = [f"row {i} of file {f}" for i in range(len(file_rows))]
        if shape == "levels":
            table = pa.table({"snac_0": levels[0], "snac_1": levels[1], "snac_2": levels[2], "text": texts})
        elif shape == "strings":
            table = pa.table({"flat_codes": [None if c is None else " ".join(map(str, c)) for c in flat],
                              "text": texts})
        else:
            table = pa.table({"snac24khz": pa.array(flat, pa.list_(pa.int32())), "transcription": texts})
        pq.write_table(table, os.path.join(folder, f"part-{f}.parquet"), row_group_size=2)
    return folder


@pytest.fixture(scope="module")
def config_only_codec(codec_dir, tmp_path_factory):
    """The codec's config.json alone: pre-tokenised codes need its layout, not its weights."""
    d = tmp_path_factory.mktemp("codec_config")
    shutil.copy(os.path.join(codec_dir, "config.json"), d / "config.json")
    return str(d)


@pytest.fixture(scope="module")
def codes_prepared(code_rows, config_only_codec, tmp_path_factory):
    """Each shape through prepare_audio.py: (out_dir, result) per shape."""
    runs = {}
    for shape in ("lists", "strings", "levels"):
        src = write_codes(str(tmp_path_factory.mktemp("codes") / shape), code_rows, shape)
        out = str(tmp_path_factory.mktemp("out") / shape)
        flag = ["--codes_column=flat_codes"] if shape == "strings" else []
        r = run_prepare(f"--dataset={src}", f"--codec={config_only_codec}", f"--out_dir={out}",
                        "--device=cpu", "--text_encoding=none",
                        "--shard_tokens=200", *flag)
        assert r.returncode == 0, r.stderr
        runs[shape] = (src, out, r)
    return runs


def test_codes_in_every_shape_give_the_same_shards(codes_prepared, code_rows, config_only_codec):
    expected = [LAYOUT.codes_to_tokens(row) for rows in code_rows for row in rows if isinstance(row, list)]
    columns = {"lists": "snac24khz", "strings": "flat_codes", "levels": "snac_0, snac_1, snac_2"}
    for shape, (_, out, r) in codes_prepared.items():
        docs = documents(out)
        assert len(docs) == len(expected) and all(np.array_equal(d, e) for d, e in zip(docs, expected)), shape
        assert f"reading columns {columns[shape]} (pre-tokenised SNAC codes: no codec runs)" in r.stdout
        assert r.stdout.count("transcripts from column") == 1
        meta = json.load(open(os.path.join(out, "meta.json")))
        assert meta["codec"] == config_only_codec and meta["vocab_size"] == LAYOUT.vocab_size
        seconds = sum(len(e) // 7 for e in expected) * 2048 / 24000
        assert meta["splits"]["train"]["seconds"] + meta["splits"]["val"]["seconds"] == pytest.approx(seconds, 1e-3)
        # one warning per bad row, naming the file and the row
        bad = [(f"part-{f}.parquet", i, row) for f, rows in enumerate(CODE_ROWS) for i, row in enumerate(rows)
               if isinstance(row, str)]
        assert [(s["file"], s["row"]) for s in meta["skipped"]] == [(name, i) for name, i, _ in bad]
        for (name, i, kind), s in zip(bad, meta["skipped"]):
            assert BAD_REASONS[kind] in s["reason"] or (shape == "levels" and kind == "short" and
                                                        "level 2 has 7 codes, expected 8" in s["reason"]), s
            assert any(f"warning: {name} row {i}: {s['reason']}; skipped" in line for line in r.stderr.splitlines())
    ref = codes_prepared["lists"][1]
    for shape in ("strings", "levels"):  # byte for byte (meta.json differs only in dataset and reasons)
        shards = sorted(f for f in os.listdir(ref) if f.endswith(".bin"))
        assert shards == sorted(f for f in os.listdir(codes_prepared[shape][1]) if f.endswith(".bin"))
        assert all(filecmp.cmp(os.path.join(ref, f), os.path.join(codes_prepared[shape][1], f), shallow=False)
                   for f in shards)


def test_max_hours_and_max_items_take_a_prefix(codes_prepared, config_only_codec, tmp_path):
    src, full, _ = codes_prepared["lists"]
    docs = documents(full)
    seconds = [len(d) // 7 * 2048 / 24000 for d in docs]
    for flag, n in ((f"--max_hours={(sum(seconds[:4]) + seconds[4] / 2) / 3600}", 4), ("--max_items=3", 3)):
        out = str(tmp_path / flag[2:11])
        r = run_prepare(f"--dataset={src}", f"--codec={config_only_codec}", f"--out_dir={out}",
                        "--device=cpu", "--text_encoding=none",
                        flag)
        assert r.returncode == 0, r.stderr
        got = documents(out)
        assert len(got) == n and all(np.array_equal(a, b) for a, b in zip(got, docs)), flag
        meta = json.load(open(os.path.join(out, "meta.json")))
        assert [s["row"] for s in meta["skipped"]] == [2]  # the bad row inside the prefix; later ones are not read


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_a_limit(codes_prepared, config_only_codec, tmp_path):
    # ranks split the parquet files; with --max_items each stops past its share of the prefix
    src = codes_prepared["lists"][0]
    outs = []
    for torchrun in (False, True):
        out = str(tmp_path / f"torchrun{torchrun}")
        r = run_prepare(f"--dataset={src}", f"--codec={config_only_codec}", f"--out_dir={out}",
                        "--device=cpu", "--text_encoding=none",
                        "--max_items=6", torchrun=torchrun, env={**ENV, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out)
    assert len(documents(outs[0])) == 6
    assert_same_output(*outs)


@pytest.mark.slow
def test_strict_and_column_errors_are_one_line(codes_prepared, config_only_codec, tmp_path):
    src = codes_prepared["levels"][0]
    cases = [(["--strict"], "part-0.parquet row 2: level 2 has 7 codes, expected 8"),
             (["--codes_column=snac_0,snac_1"], "one column per level (3 for this codec"),
             (["--text_column=nope"], "--text_column=nope: no such column")]
    for flags, expect in cases:
        r = run_prepare(f"--dataset={src}", f"--codec={config_only_codec}", f"--out_dir={tmp_path / 'out'}",
                        "--device=cpu", "--text_encoding=none", *flags)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 1 and len(errors) == 1 and expect in errors[0], (flags, r.stderr)
        assert "Traceback" not in r.stderr
    # the Hub path up to its network call: offline, one line that says how to use a local folder instead
    r = run_prepare("--dataset=nobody-gpt2o/no-such-parquet-set", f"--codec={config_only_codec}",
                    f"--out_dir={tmp_path / 'hub'}", "--device=cpu", "--text_encoding=none")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and ".parquet files into a folder" in r.stderr


def test_float_codes_and_a_numeric_text_column_are_refused():
    """Codes 1.5 are a bad row (int64 would truncate them to 1); 3.0 is code 3. A transcript column of numbers is
    one error naming it, found by name or given with --text_column."""
    from sources import codes_to_tokens, pick_columns
    with pytest.raises(ValueError, match="code 1.5 at position 2 is not an integer"):
        codes_to_tokens([1, 2, 1.5, 4, 5, 6, 7], LAYOUT)
    with pytest.raises(ValueError, match="not an integer"):
        codes_to_tokens(([1.5], [1, 2], [1, 2, 3, 4]), LAYOUT)
    assert codes_to_tokens([3.0] * 7, LAYOUT).tolist() == codes_to_tokens([3] * 7, LAYOUT).tolist()
    schema = pa.schema([("snac24khz", pa.list_(pa.int32())), ("text", pa.int64())])
    for flag, expect in (("", "column 'text': holds int64, not text"), ("text", "--text_column=text: holds int64")):
        with pytest.raises(ValueError, match=expect):
            pick_columns(schema, "d", flag, "", 3)
    schema = schema.append(pa.field("sentence", pa.string()))  # a column of strings by a known name: that one
    assert pick_columns(schema, "d", "", "", 3).text == "sentence"


def test_an_empty_parquet_dataset_says_what_is_empty(config_only_codec, tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    pq.write_table(pa.table({"snac24khz": pa.array([], pa.list_(pa.int32())), "text": pa.array([], pa.string())}),
                   src / "part-0.parquet")
    r = run_prepare(f"--dataset={src}", f"--codec={config_only_codec}", f"--out_dir={tmp_path / 'out'}",
                    "--device=cpu", "--text_encoding=none")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "its 1 parquet file(s) hold no rows" in errors[0], r.stderr
    assert "see the warnings" not in r.stderr and "Traceback" not in r.stderr

