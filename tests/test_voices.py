"""Speakers and voice cloning: LibriTTS folders, a parquet speaker column and a metadata.csv speaker field prepare
into items whose text names the speaker (tokenizer.voice_text) and, with --clone_fraction, into cloning items of two
consecutive utterances of one speaker; they resume after kill -9 byte-identical and report bad rows. generate.py
speaks in a trained voice (--voice) or in a reference's (--prompt + --prompt_text). The learning proof: a tiny model
trained on synthetic speakers continues a reference in the reference's speaker, and does not without cloning items."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

import sampling
from conftest import SNAC_24KHZ_CONFIG, TEXT_ENCODING, assert_one_line_error, run_script, save_random_snac, \
    synth_audio, tiny_gpt
from test_prepare import assert_same_output, kill_after_cache_entries, run_prepare
from test_text import read_documents, run_generate, save_model
from tokenizer import Layout, voice_text

CB = 4096


def codes_row(layout: Layout, n_frames: int, seed: int) -> list[int]:
    """Flattened codes of the audio-only layout (level * codebook + code), as a codes column holds them."""
    frames = np.random.default_rng(seed).integers(0, CB, (n_frames, layout.frame_size))
    return (frames + layout.frame_levels * CB).reshape(-1).tolist()


def text_ids(doc: np.ndarray, layout: Layout) -> list[list[int]]:
    """The text segments of a document, in order."""
    sp, out, cur = layout.special_tokens, [], None
    for t in doc.tolist():
        if t == sp["text_start"]:
            cur = []
        elif t == sp["text_end"]:
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


# -----------------------------------------------------------------------------
# voice_text: the one rule

def test_voice_text_rule():
    assert voice_text("Hello.") == "Hello." and voice_text("Hello.", "84") == "84: Hello."
    assert voice_text("Hi.", "tara", ["leo", "tara"]) == "tara: Hi."
    with pytest.raises(ValueError, match="voice 'zoe': unknown .*known voices: leo, tara"):
        voice_text("Hi.", "zoe", ["leo", "tara"])
    with pytest.raises(ValueError, match="trained without speakers"):
        voice_text("Hi.", "zoe", [])


# -----------------------------------------------------------------------------
# parquet speaker column: voices in the text, cloning items, resume, bad rows

SPEAKERS = ["ann", "bob", None, "ann", "bob", "ann", "bob", 7]
TEXTS = ["Holmes came.", "The data.", "You see.", "I observe.", "The woman.", "Capital.", "Facts.", "Love."]


@pytest.fixture(scope="module")
def codes_parquet(tmp_path_factory, codec_dir):
    d = tmp_path_factory.mktemp("speakers_parquet")
    codec = d / "codec"  # pre-tokenised codes: the codec's config.json is all that is read
    codec.mkdir()
    shutil.copy(os.path.join(codec_dir, "config.json"), codec / "config.json")
    layout = Layout((4, 2, 1), CB)
    codes = [codes_row(layout, 2 + i % 2, seed=i) for i in range(len(TEXTS))]
    codes[5] = [1, 2, 3]  # a bad row: not whole frames
    (d / "src").mkdir()
    speaker = pa.array([None if s is None else str(s) for s in SPEAKERS])
    pq.write_table(pa.table({"snac24khz": codes, "text": TEXTS, "who": speaker}), d / "src" / "part-0.parquet",
                   row_group_size=2)
    return d, codes


def test_parquet_speaker_column_and_cloning_items(codes_parquet, text_tok, tmp_path):
    d, codes = codes_parquet
    layout, enc = text_tok.layout, text_tok.text
    args = [f"--dataset={d / 'src'}", f"--codec={d / 'codec'}", "--device=cpu", f"--text_encoding={TEXT_ENCODING}",
            "--val_files=0", "--asr_fraction=0", "--speaker_column=who", "--clone_fraction=1"]
    out = tmp_path / "out"
    r = run_prepare(*args, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "warning: part-0.parquet row 5: 3 codes is not a whole number" in r.stderr
    meta = json.load(open(out / "meta.json"))
    assert meta["voices"] == ["7", "ann", "bob"] and meta["clone_fraction"] == 1
    assert meta["skipped"] == [{"file": "part-0.parquet", "row": 5, "reason": "3 codes is not a whole number of "
                                "7-code frames"}]
    docs = read_documents(str(out), "train", layout)
    audio = [layout.audio_offset + np.array(c) for c in codes]
    ids = [enc.encode_ordinary(t) for t in TEXTS]
    # rows 0, 1: the first of their speaker, named; row 2: nobody, plain; rows 3, 4, 6: cloning items after the
    # speaker's previous utterance (row 5 is bad: row 6's reference is row 4, bob's last)
    expected = [layout.document(audio=audio[0], text=enc.encode_ordinary("ann: Holmes came.")),
                layout.document(audio=audio[1], text=enc.encode_ordinary("bob: The data.")),
                layout.document(audio=audio[2], text=ids[2]),
                layout.clone_document(audio[0], ids[0], audio[3], ids[3]),
                layout.clone_document(audio[1], ids[1], audio[4], ids[4]),
                layout.clone_document(audio[4], ids[4], audio[6], ids[6]),
                layout.document(audio=audio[7], text=enc.encode_ordinary("7: Love."))]
    assert [x.tolist() for x in docs] == [e.tolist() for e in expected]
    assert meta["splits"]["train"]["cloning_items"] == 3
    assert meta["splits"]["train"]["text_tokens"] == sum(int((e < layout.text_vocab).sum()) for e in expected)

    # no cloning: every speaker's item names them
    plain = tmp_path / "plain"
    r = run_prepare(*args[:-1], "--clone_fraction=0", f"--out_dir={plain}")
    assert r.returncode == 0, r.stderr
    texts = [text_ids(x, layout) for x in read_documents(str(plain), "train", layout)]
    assert [enc.decode(t[0]) for t in texts] == ["ann: Holmes came.", "bob: The data.", "You see.", "ann: I observe.",
                                                 "bob: The woman.", "bob: Facts.", "7: Love."]


@pytest.mark.slow
def test_audio_parquet_speakers_resume_after_kill(tmp_path, codec_dir, text_tok):
    """Audio bytes with a speaker column: killed after two row groups are cached, then run again, byte-identical."""
    from test_parquet import AUDIO_TYPE, audio_bytes
    (tmp_path / "src").mkdir()
    cells = [{"bytes": audio_bytes(0.4, 24000, 1, "WAV", i), "path": f"{i}.wav"} for i in range(5)]
    cells[2]["bytes"] = b"RIFF" + b"\1" * 200  # a bad row
    pq.write_table(pa.table({"audio": pa.array(cells, type=AUDIO_TYPE), "text": ["One.", "Two.", "x", "Four.",
                                                                                 "Five."],
                             "speaker": [3, 4, 3, 3, 4]}), tmp_path / "src" / "a.parquet", row_group_size=1)
    args = [f"--dataset={tmp_path / 'src'}", f"--codec={codec_dir}", "--device=cpu", "--val_files=0",
            f"--text_encoding={TEXT_ENCODING}", "--asr_fraction=0", "--speaker_column=speaker", "--clone_fraction=1"]
    ref, again = str(tmp_path / "ref"), str(tmp_path / "again")
    r = run_prepare(*args, f"--out_dir={ref}")
    assert r.returncode == 0, r.stderr
    assert "warning: a.parquet row 2:" in r.stderr
    meta = json.load(open(os.path.join(ref, "meta.json")))
    assert meta["voices"] == ["3", "4"] and meta["splits"]["train"]["cloning_items"] == 2
    kill_after_cache_entries([*args, f"--out_dir={again}"], again)
    r = run_prepare(*args, f"--out_dir={again}")
    assert r.returncode == 0, r.stderr
    assert_same_output(ref, again)


def test_speaker_column_errors_are_one_line(codes_parquet, tmp_path):
    d, _ = codes_parquet
    base = [f"--dataset={d / 'src'}", f"--codec={d / 'codec'}", "--device=cpu", f"--out_dir={tmp_path / 'o'}"]
    r = run_prepare(*base, f"--text_encoding={TEXT_ENCODING}", "--speaker_column=speaker")
    assert_one_line_error(r, "--speaker_column=speaker", "no such column", "who")
    r = run_prepare(*base, f"--text_encoding={TEXT_ENCODING}", "--speaker_column=text", "--clone_fraction=2")
    assert_one_line_error(r, "clone_fraction", "[0, 1]")
    r = run_prepare(*base, "--text_encoding=none", "--speaker_column=who")
    assert_one_line_error(r, "speaker_column", "text encoding")
    assert not os.path.exists(tmp_path / "o")


# -----------------------------------------------------------------------------
# audio folders: LibriTTS's speaker/chapter/utt, a metadata.csv speaker field

def write_clip(path, seconds: float, seed: int, text: str | None = None, suffix: str = ".normalized.txt") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, synth_audio(seconds, 24000, seed=seed), 24000)
    if text is not None:
        open(path[:-4] + suffix, "w").write(text)


def test_libritts_folders_name_their_speakers(tmp_path, codec_dir, text_tok):
    root = tmp_path / "LibriTTS" / "train-clean-100"
    utts = [("19", "198", "000000_000000", "Holmes came."), ("19", "198", "000001_000000", "The data."),
            ("84", "121123", "000002_000001", "You see.")]
    for i, (spk, chap, utt, text) in enumerate(utts):
        write_clip(str(root / spk / chap / f"{spk}_{chap}_{utt}.wav"), 0.2, i, text)
    write_clip(str(root / "84" / "121123" / "84_121123_000003_000000.wav"), 0.2, 9, "Broken.")
    (root / "84" / "121123" / "84_121123_000003_000000.wav").write_bytes(b"RIFF" + b"\1" * 100)  # bad file
    write_clip(str(root / "notes" / "loose.wav"), 0.2, 5, "Facts.")  # not LibriTTS-named: no speaker
    out = tmp_path / "out"
    r = run_prepare(f"--dataset={root.parent}", f"--codec={codec_dir}", f"--out_dir={out}", "--device=cpu",
                    f"--text_encoding={TEXT_ENCODING}", "--val_files=0", "--asr_fraction=0")
    assert r.returncode == 0, r.stderr
    assert "warning: train-clean-100/84/121123/84_121123_000003_000000.wav:" in r.stderr
    meta = json.load(open(out / "meta.json"))
    assert meta["voices"] == ["19", "84"]
    texts = [text_tok.text.decode(text_ids(x, text_tok.layout)[0])
             for x in read_documents(str(out), "train", text_tok.layout)]
    assert texts == ["19: Holmes came.", "19: The data.", "84: You see.", "Facts."]


def test_metadata_csv_speaker_field(tmp_path, codec_dir, text_tok):
    root = tmp_path / "ds"
    for i in range(3):
        write_clip(str(root / "wavs" / f"c{i}.wav"), 0.2, i)
    # LJSpeech's three fields (id, text, normalized text), then the speaker; a header row names them
    (root / "metadata.csv").write_text("id|text|normalized|speaker\nc0|One.|One.|amy\nc1|Two.|Two.|\n"
                                       "c2|Three.|Three.|ben\n")
    out = tmp_path / "out"
    base = [f"--dataset={root}", f"--codec={codec_dir}", "--device=cpu", f"--text_encoding={TEXT_ENCODING}",
            "--val_files=0", "--asr_fraction=0"]
    r = run_prepare(*base, f"--out_dir={out}", "--speaker_column=speaker")
    assert r.returncode == 0, r.stderr
    texts = [text_tok.text.decode(text_ids(x, text_tok.layout)[0])
             for x in read_documents(str(out), "train", text_tok.layout)]
    assert texts == ["amy: One.", "Two.", "ben: Three."]
    assert json.load(open(out / "meta.json"))["voices"] == ["amy", "ben"]
    r = run_prepare(*base, f"--out_dir={tmp_path / 'o2'}", "--speaker_column=voice")
    assert_one_line_error(r, "--speaker_column=voice", "metadata.csv", "header")


# -----------------------------------------------------------------------------
# generate.py --voice and --prompt_text

def test_generate_voice_and_cloning_cli(tmp_path, text_tok):
    meta = {**text_tok.meta(), "voices": ["amy", "ben"]}
    ckpt = save_model(str(tmp_path / "ckpt.pt"), tiny_gpt(text_tok.layout.vocab_size, block_size=128), meta)
    common = [f"--ckpt={ckpt}", "--device=cpu", "--num_samples=1", "--seconds=0.4"]
    r = run_generate(*common, "--text=You see.", "--voice=ben", f"--out_dir={tmp_path / 'v'}")
    assert r.returncode == 0, r.stderr
    assert "in the voice of ben" in r.stdout and sf.info(str(tmp_path / "v" / "sample_0.wav")).frames % 2048 == 0
    r = run_generate(*common, "--text=You see.", "--voice=cat", f"--out_dir={tmp_path / 'v'}")
    assert_one_line_error(r, "voice 'cat'", "amy, ben")
    sf.write(tmp_path / "ref.wav", synth_audio(0.5, 24000), 24000)
    r = run_generate(*common, "--text=You see.", f"--prompt={tmp_path / 'ref.wav'}", "--prompt_text=The data.",
                     f"--out_dir={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr
    assert f"in the voice of {tmp_path / 'ref.wav'}" in r.stdout
    assert sorted(os.listdir(tmp_path / "c")) == ["sample_0.wav"]  # the new words only, no continuation file
    r = run_generate(*common, "--text=You see.", f"--prompt={tmp_path / 'ref.wav'}")
    assert_one_line_error(r, "--prompt_text")
    r = run_generate(*common, "--prompt_text=The data.")
    assert_one_line_error(r, "--prompt_text", "--text and --prompt")
    r = run_generate(*common, "--voice=amy")
    assert_one_line_error(r, "--voice=amy", "--text")
    no_voices = save_model(str(tmp_path / "plain.pt"), tiny_gpt(text_tok.layout.vocab_size), text_tok.meta())
    r = run_generate(f"--ckpt={no_voices}", "--device=cpu", "--text=Hi.", "--voice=amy")
    assert_one_line_error(r, "voice 'amy'", "trained without speakers")


def test_model_card_lists_voices():
    import export
    meta = {"tokens_per_second": 82.03, "frame_hop": 2048, "sample_rate": 24000, "codebook_size": 4096,
            "codec": "hubertsiuzdak/snac_24khz", "voices": ["amy", "ben"]}
    card = export.model_card(export.ExportConfig(out="exported/x"), meta, {"block_size": 64}, 1000,
                             {"iter_num": 1, "tokens_seen": 10}, [])
    assert "Voices (2): `amy`, `ben`" in card and "--voice=amy" in card
    assert "Voices" not in export.model_card(export.ExportConfig(out="x"), {**meta, "voices": []}, {"block_size": 64},
                                             1000, {"iter_num": 1, "tokens_seen": 10}, [])


# -----------------------------------------------------------------------------
# the learning proof: cloning keeps the reference's speaker

SMALL_CB = 32
N_SPEAKERS, PER_SPEAKER, RANGE = 4, 8, 8  # speaker k's codes are k * RANGE .. k * RANGE + RANGE - 1 on every level
WORDS = "the woman Holmes mistake data facts observe love mind machine reasoning world capital theories eyes name"


def speaker_of(audio: np.ndarray, layout: Layout) -> int:
    """The speaker whose code range holds most of these audio ids' codes. By construction each synthetic speaker
    draws every code from its own range, so the range is the voice, and it is read off the codes alone."""
    codes = (np.asarray(audio) - layout.audio_offset) % SMALL_CB
    return int(np.bincount(codes // RANGE, minlength=N_SPEAKERS).argmax())


def synthetic_speakers(enc) -> list[tuple[str, str, list[int]]]:
    """(speaker, sentence, codes): PER_SPEAKER utterances each, interleaved across speakers in row order; the codes
    of a frame are a function of the text token (what is said) and the speaker (their range)."""
    rng, rows = np.random.default_rng(0), []
    sentences = []
    while len(sentences) < N_SPEAKERS * PER_SPEAKER:
        s = " ".join(rng.choice(WORDS.split(), size=2, replace=False))
        if len(enc.encode_ordinary(s)) <= 4 and s not in sentences:
            sentences.append(s)
    for i, sentence in enumerate(sentences):
        k = i % N_SPEAKERS
        frames = np.stack([k * RANGE + np.random.default_rng(1000 + t).integers(0, RANGE, 7)
                           for t in enc.encode_ordinary(sentence)])
        rows.append((f"s{k}", sentence, (frames + np.array([0, 1, 2, 2, 1, 2, 2]) * SMALL_CB).reshape(-1).tolist()))
    return rows


def train_speakers(tmp_path, codec: str, rows, clone_fraction: float, name: str) -> str:
    src = tmp_path / f"{name}_src"
    src.mkdir()
    pq.write_table(pa.table({"snac24khz": [r[2] for r in rows], "text": [r[1] for r in rows],
                             "speaker": [r[0] for r in rows]}), src / "part-0.parquet")
    data, out = tmp_path / f"{name}_data", tmp_path / f"{name}_out"
    r = run_prepare(f"--dataset={src}", f"--codec={codec}", f"--out_dir={data}", "--device=cpu",
                    f"--text_encoding={TEXT_ENCODING}", f"--val_files={N_SPEAKERS}", "--asr_fraction=0",
                    "--speaker_column=speaker", f"--clone_fraction={clone_fraction}")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--compile=False",
                   "--n_layer=2", "--n_head=2", "--n_embd=96", "--block_size=96", "--batch_size=16",
                   "--gradient_accumulation_steps=1", "--learning_rate=3e-3", "--min_lr=3e-4", "--beta2=0.99",
                   "--warmup_iters=20", "--max_iters=500", "--eval_interval=500", "--eval_iters=1",
                   "--log_interval=250", "--eval_samples=0", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    return str(out / "ckpt.pt")


@pytest.mark.slow
def test_tiny_model_learns_to_keep_a_reference_voice(tmp_path_factory, tmp_path):
    import generate
    from codec import load_codec
    codec = save_random_snac(str(tmp_path_factory.mktemp("snac_small")), {
        **SNAC_24KHZ_CONFIG, "encoder_dim": 8, "decoder_dim": 16, "codebook_size": SMALL_CB, "noise": False})
    tok = load_codec(codec, text_encoding=TEXT_ENCODING)
    layout, enc = tok.layout, tok.text
    rows = synthetic_speakers(enc)
    # held-in prompts: each training utterance after its speaker's first, with that speaker's previous one as the
    # reference (rows are interleaved, so the previous one is N_SPEAKERS rows back); the val rows are the first ones
    prompts = [(rows[i - N_SPEAKERS], rows[i]) for i in range(2 * N_SPEAKERS, len(rows))]

    def kept(ckpt: str) -> float:
        model, _ = generate.load_model(generate.GenerateConfig(ckpt=ckpt, text="-"), "cpu", "float32")
        hits = 0
        for (_, ref_text, ref_codes), (who, text, _) in prompts:
            ref = np.array(ref_codes) + layout.audio_offset
            context = torch.from_numpy(layout.clone_context(ref, enc.encode_ordinary(ref_text),
                                                            enc.encode_ordinary(text)))
            out = sampling.generate_tokens(model, layout, None, 4, temperature=0.0, context=context)
            tokens, n = sampling.cut_at_end(out, layout)
            audio = tokens[0, :int(n[0]) * layout.frame_size].numpy()
            hits += len(audio) > 0 and speaker_of(audio, layout) == int(who[1:])
        return hits / len(prompts)

    cloned = kept(train_speakers(tmp_path, codec, rows, 1.0, "clone"))
    assert cloned >= 0.9, cloned
    # the control: the same speakers without cloning items (each item names its speaker instead) do not learn it
    control = kept(train_speakers(tmp_path, codec, rows, 0.0, "plain"))
    assert control < 0.9, (cloned, control)
    print(f"reference's speaker kept: {cloned:.0%} with cloning items, {control:.0%} without")
