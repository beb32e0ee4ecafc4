"""Text and audio in one stream: the text+audio layout and its documents, the tiktoken encoding loaded through a
tiktoken_ext plugin (offline), and the sampling grammar over the special tokens."""
import numpy as np
import pytest
import torch

from conftest import TEXT_ENCODING, run_script, tiny_gpt
import sampling
from model import GPT, GPTConfig
from tokenizer import LAYOUT_NAME, TEXT_LAYOUT_NAME, Layout, load_text_encoding, text_token_bytes

CB = 4096


@pytest.fixture(scope="module")
def enc():
    return load_text_encoding(TEXT_ENCODING)


@pytest.fixture(scope="module")
def layout(enc):
    return Layout((4, 2, 1), CB, enc.name, enc.n_vocab)


def random_audio(layout: Layout, n_frames: int, seed: int = 0) -> np.ndarray:
    codes = [np.random.default_rng(seed + k).integers(0, CB, n_frames * k) for k in layout.codes_per_frame]
    return layout.codes_to_tokens(codes)


def test_text_layout_ids(enc, layout):
    tv = enc.n_vocab
    assert layout.name == TEXT_LAYOUT_NAME and layout.audio_offset == tv == 457
    codes = [np.array([5]), np.array([6, 7]), np.array([8, 9, 10, 11])]
    assert layout.codes_to_tokens(codes).tolist() == [tv + 5, tv + CB + 6, tv + 2 * CB + 8, tv + 2 * CB + 9,
                                                     tv + CB + 7, tv + 2 * CB + 10, tv + 2 * CB + 11]
    audio = random_audio(layout, 6)
    assert all(np.array_equal(a, b) for a, b in zip(layout.tokens_to_codes(audio), layout.tokens_to_codes(
        torch.from_numpy(audio))))
    first = tv + 3 * CB
    assert layout.special_tokens == {"boundary": first, "text_start": first + 1, "text_end": first + 2,
                                     "audio_start": first + 3, "audio_end": first + 4}
    assert layout.vocab_size == first + 5
    meta = layout.meta()
    assert meta["text_encoding"] == TEXT_ENCODING and meta["text_vocab"] == tv and meta["audio_offset"] == tv
    assert Layout.from_meta(meta) == layout
    with pytest.raises(ValueError, match="special_tokens"):
        Layout.from_meta({**meta, "special_tokens": {**meta["special_tokens"], "audio_end": 1}})
    with pytest.raises(ValueError, match="incomplete"):
        Layout.from_meta({k: v for k, v in meta.items() if k != "text_vocab"})
    # the audio-only layout is unchanged: what old datasets and checkpoints hold
    old = Layout((4, 2, 1), CB)
    assert old.name == LAYOUT_NAME and old.audio_offset == 0 and old.special_tokens == {"boundary": 3 * CB}
    assert Layout.from_meta(old.meta()) == old and "text_vocab" not in old.meta()
    # eval groups of the target ids
    ids = torch.tensor([0, tv - 1, tv, tv + CB, tv + 3 * CB - 1, first, first + 4])
    assert layout.groups(ids).tolist() == [3, 3, 0, 1, 2, 4, 4]
    assert layout.group_names == ["L0", "L1", "L2", "text", "special"]
    assert old.groups(torch.tensor([0, 2 * CB, 3 * CB])).tolist() == [0, 2, 4]


def test_repair_drops_text_and_specials(layout):
    audio = random_audio(layout, 3)
    stream = np.concatenate([layout.speech_context([1, 2, 3]), audio[:10], [7, layout.boundary_id], audio[10:]])
    assert np.array_equal(layout.repair(stream), audio)


def test_documents_and_contexts(layout):
    sp = layout.special_tokens
    B, TS, TE, AS, AE = (sp[k] for k in ("boundary", "text_start", "text_end", "audio_start", "audio_end"))
    audio, text = random_audio(layout, 2), np.array([10, 20, 30])
    tts = layout.document(audio=audio, text=text, text_first=True)
    asr = layout.document(audio=audio, text=text, text_first=False)
    assert tts.tolist() == [B, TS, 10, 20, 30, TE, AS, *audio, AE]
    assert asr.tolist() == [B, AS, *audio, AE, TS, 10, 20, 30, TE]
    assert layout.document(audio=audio).tolist() == [B, AS, *audio, AE]
    assert layout.document(text=text).tolist() == [B, TS, 10, 20, 30, TE]
    # generation contexts are the documents' own prefixes, so a prompt looks exactly like training data
    assert layout.speech_context(text).tolist() == tts[:len(text) + 4].tolist()
    assert layout.transcript_context(audio).tolist() == asr[:len(audio) + 4].tolist()
    assert layout.audio_context().tolist() == [B, AS]
    assert layout.audio_context(audio).tolist() == [B, AS, *audio]
    with pytest.raises(ValueError, match="whole 7-token frames"):
        layout.document(audio=audio[:-1])
    with pytest.raises(ValueError, match="whole 7-token frames"):
        layout.document(audio=audio - layout.audio_offset)  # audio-only ids are not audio here
    with pytest.raises(ValueError, match="text ids"):
        layout.document(text=[layout.text_vocab])
    old = Layout((4, 2, 1), CB)
    old_audio = old.codes_to_tokens(layout.tokens_to_codes(audio))
    assert old.document(audio=old_audio).tolist() == [3 * CB, *old_audio]  # the audio-only format, as before
    assert old.audio_context().tolist() == [3 * CB]
    with pytest.raises(ValueError, match="holds no text"):
        old.document(text=text)


def test_text_encoding_through_the_plugin(enc, text_tok):
    sentence = "It is a capital mistake to theorize before one has data. <|endoftext|>"
    ids = text_tok.encode_text(sentence)
    assert text_tok.decode_text(ids) == sentence and ids.max() < enc.n_vocab
    eot = enc.encode_single_token("<|endoftext|>")
    assert eot not in ids.tolist()  # encode_ordinary: special-token strings are plain text
    nbytes = text_token_bytes(enc)
    assert nbytes[eot] == 0 and nbytes[ids].sum() == len(sentence.encode())
    assert text_tok.layout.text_encoding == TEXT_ENCODING and text_tok.meta()["layout"] == TEXT_LAYOUT_NAME


def test_missing_text_encoding_is_one_actionable_line():
    with pytest.raises(ValueError, match="tiktoken knows no such encoding .*gpt2o_test.*tiktoken_ext"):
        load_text_encoding("no_such_encoding")
    # tiktoken's own download code runs and fails, as it does for gpt2 offline
    with pytest.raises(ValueError, match="cannot be downloaded .*TIKTOKEN_CACHE_DIR.*tiktoken_ext") as e:
        load_text_encoding("gpt2o_test_unreachable")
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# the sampling grammar


def test_grammar_audio_ends_only_at_a_frame_start(layout):
    V, fs, AE = layout.vocab_size, layout.frame_size, layout.special("audio_end")
    g = sampling.Grammar(layout, V, "cpu")
    state = g.start(torch.from_numpy(layout.speech_context([1, 2])), batch=3)
    assert state.tolist() == [0, 0, 0]
    rng = torch.Generator().manual_seed(0)
    picked = []
    for step in range(4 * fs):
        logits = torch.randn(3, V, generator=rng)
        logits[:, AE] = 100.0 if step >= 10 else -100.0  # wanted from step 10 (position 3 of frame 1) on
        logits[:, layout.boundary_id] = logits[:, 0] = 100.0  # never allowed in audio
        token = g.mask(logits, state).argmax(dim=-1)
        picked.append(token)
        state = g.advance(state, token)
    picked = torch.stack(picked, dim=1)  # (3, 4 * fs)
    assert (picked[:, 2 * fs:] == AE).all() and not (picked[:, :2 * fs] == AE).any()  # at the next frame start
    layout.tokens_to_codes(picked[:, :2 * fs])  # every token before it at its frame position's level
    assert g.ended(state).all()
    kept_tokens, kept = sampling.cut_at_end(picked, layout)
    assert kept.tolist() == [2, 2, 2] and torch.equal(kept_tokens[:, :2 * fs], picked[:, :2 * fs])
    layout.tokens_to_codes(kept_tokens)  # the rest is filler that decodes


def test_grammar_text(layout, enc):
    V, TE = layout.vocab_size, layout.special("text_end")
    text_ok = torch.from_numpy(text_token_bytes(enc) > 0)
    g = sampling.Grammar(layout, V, "cpu", text_ok)
    state = g.start(torch.from_numpy(layout.transcript_context(random_audio(layout, 2))), batch=2)
    assert state.tolist() == [g.TEXT] * 2
    eot = enc.encode_single_token("<|endoftext|>")
    logits = torch.zeros(2, V)
    logits[:, [eot, layout.boundary_id, layout.audio_offset, layout.special("audio_end")]] = 100.0  # all forbidden
    logits[:, 42] = 1.0
    token = g.mask(logits, state).argmax(dim=-1)
    assert token.tolist() == [42, 42]
    state = g.advance(state, token)
    logits[1, TE] = 200.0
    token = g.mask(logits, state).argmax(dim=-1)
    state = g.advance(state, token)
    assert token.tolist() == [42, TE] and g.ended(state).tolist() == [False, True]
    assert g.mask(torch.zeros(2, V), state)[1].isfinite().nonzero().reshape(-1).tolist() == [TE]  # repeats its end


def test_grammar_start_needs_an_open_segment(layout):
    g = sampling.Grammar(layout, layout.vocab_size, "cpu")
    audio = random_audio(layout, 2)
    assert g.start(torch.from_numpy(np.concatenate([layout.audio_context(), audio[:9]])), 1).tolist() == [2]
    with pytest.raises(ValueError, match="inside an audio or text segment"):
        g.start(torch.from_numpy(layout.document(audio=audio)), 1)  # closed by AUDIO_END
    old = Layout((4, 2, 1), CB)
    og = sampling.Grammar(old, old.vocab_size, "cpu")
    assert og.start(torch.tensor([old.boundary_id]), 2).tolist() == [0, 0] and not og.can_end
    assert torch.equal(og.masks[:7], sampling.frame_masks(old, old.vocab_size, "cpu"))


def test_random_model_speaks_and_transcribes_validly(layout, enc):
    """Any model, trained or not: speech decodes (frames, then AUDIO_END at a frame start, or the cap), and
    transcription writes only ordinary text ids, also when the window slides."""
    model = tiny_gpt(layout.vocab_size)
    ae = layout.special("audio_end")
    # make AUDIO_END likely, so rows end at different frames: its output row along the mean final hidden state
    hidden = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: hidden.append(out))
    model(torch.from_numpy(random_audio(layout, 8))[None])
    hook.remove()
    direction = hidden[0].mean(0)  # the residual stream is (B * T, n_embd); B = 1
    g = torch.Generator().manual_seed(0)
    ctx = torch.from_numpy(layout.speech_context(enc.encode_ordinary("You see, but you do not observe.")))
    for scale, n_frames in ((2.0, 20), (6.0, 40)):
        with torch.no_grad():
            model.lm_head.weight[ae] = direction / direction.norm() * scale * model.lm_head.weight.norm(dim=1).mean()
        out = sampling.generate_tokens(model, layout, None, n_frames, num_samples=6, temperature=1.0, generator=g,
                                       context=ctx)
        tokens, kept = sampling.cut_at_end(out, layout)
        layout.tokens_to_codes(tokens)
        for row, k in zip(out, kept.tolist()):
            layout.tokens_to_codes(row[:k * 7])
            assert (row[k * 7:] == ae).all()
        if scale == 2.0:  # some rows end, others reach the cap
            assert out.shape[1] == 20 * 7 and 0 < kept.min() < 20 and kept.max() == 20
        else:  # every row ends early, and sampling stops there
            assert out.shape[1] < 40 * 7 and kept.max() < 40
    text_ok = torch.from_numpy(text_token_bytes(enc) > 0)
    ids = sampling.transcribe(model, layout, torch.from_numpy(random_audio(layout, 6)), 40, text_ok,
                              temperature=1.0, generator=g)
    assert len(ids) <= 40 and all(text_ok[i] for i in ids)
    enc.decode(ids)


# -----------------------------------------------------------------------------
# prepare_audio.py with transcripts

LJ = {"LJ001-0001": ("Mr. Holmes came in 1891.", "Mister Holmes came in eighteen ninety-one."),
      "LJ001-0002": ("You see, but you do not observe.", "")}  # no normalized column: the raw text is used
BESIDE = {"books/a.flac": ("a.txt", "It is a capital mistake."), "books/b.wav": ("b.lab", "To Sherlock Holmes."),
          "books/c.wav": ("c.normalized.txt", "the woman, always."), "books/d.wav": None,
          "books/e.wav": ("e.txt", "  \n")}
RAW_C = "The woman (always)."  # LibriTTS's c.original.txt


@pytest.fixture(scope="module")
def transcribed(tmp_path_factory, codec_dir):
    import soundfile as sf
    from conftest import synth_audio
    from test_prepare import run_prepare
    root = tmp_path_factory.mktemp("transcribed")
    (root / "lj" / "wavs").mkdir(parents=True)
    (root / "books").mkdir()
    rows = []
    for i, (name, (raw, norm)) in enumerate(LJ.items()):
        sf.write(root / "lj" / "wavs" / f"{name}.wav", synth_audio(0.3, 22050, seed=i), 22050)
        rows.append(f"{name}|{raw}|{norm}")
    (root / "lj" / "metadata.csv").write_text("\n".join(rows) + "\n")
    for i, (rel, transcript) in enumerate(BESIDE.items()):
        sf.write(root / rel, synth_audio(0.2 + 0.05 * i, 24000, seed=10 + i), 24000)
        if transcript:
            (root / "books" / transcript[0]).write_text(transcript[1])
    (root / "books" / "c.original.txt").write_text(RAW_C)
    corpus = root.parent / f"{root.name}_book.txt"
    corpus.write_text("The Adventures of\nSherlock Holmes.\n\n\n   \nA Scandal in Bohemia.\n\nI.\n")
    out = str(root.parent / f"{root.name}_out")
    args = [f"--codec={codec_dir}", f"--dataset={root}", f"--out_dir={out}", "--device=cpu", "--val_files=1",
            f"--text_encoding={TEXT_ENCODING}", f"--text_corpus={corpus}", "--seed=3"]
    r = run_prepare(*args)
    assert r.returncode == 0, r.stderr
    return str(root), out, args, r


def read_documents(out: str, split: str, layout: Layout) -> list[np.ndarray]:
    import json
    import os
    meta = json.load(open(os.path.join(out, "meta.json")))
    stream = np.concatenate([np.fromfile(os.path.join(out, s["file"]), dtype="<u2").astype(np.int64)
                             for s in meta["shards"] if s["split"] == split])
    starts = np.flatnonzero(stream == layout.boundary_id).tolist()
    return [stream[a:b] for a, b in zip(starts, starts[1:] + [len(stream)])]


def test_prepare_pairs_transcripts_with_audio(transcribed, text_tok):
    import json
    import os
    import soundfile as sf
    from prepare_audio import transcription_first
    root, out, _, r = transcribed
    layout, enc = text_tok.layout, text_tok.text
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert Layout.from_meta(meta) == layout and meta["text_encoding"] == TEXT_ENCODING
    assert meta["special_tokens"] == layout.special_tokens and meta["vocab_size"] == layout.vocab_size
    assert [u["file"] for u in meta["untranscribed"]] == ["books/d.wav", "books/e.wav"]
    assert "warning: books/d.wav: no transcript" in r.stderr and "warning: books/e.wav: empty transcript" in r.stderr
    files = sorted(BESIDE) + [f"lj/wavs/{n}.wav" for n in LJ]  # sorted: books/a.flac (val) first
    texts = {"books/a.flac": BESIDE["books/a.flac"][1], "books/b.wav": BESIDE["books/b.wav"][1],
             "books/c.wav": BESIDE["books/c.wav"][1], "lj/wavs/LJ001-0001.wav": LJ["LJ001-0001"][1],
             "lj/wavs/LJ001-0002.wav": LJ["LJ001-0002"][0]}
    orders = {rel: transcription_first(3, rel, 0.5) for rel in texts}
    assert set(orders.values()) == {True, False}  # the seed gives both kinds of item
    docs = read_documents(out, "train", layout) + read_documents(out, "val", layout)
    expected_docs = []
    for rel in files[1:] + files[:1]:
        audio, rate = sf.read(os.path.join(root, rel), dtype="float32")
        text = enc.encode_ordinary(texts[rel]) if rel in texts else None
        expected_docs.append(layout.document(audio=text_tok.encode(audio, rate), text=text,
                                             text_first=not orders.get(rel)))
    paragraphs = ["The Adventures of Sherlock Holmes.", "A Scandal in Bohemia.", "I."]
    expected_docs[len(files) - 1:len(files) - 1] = [layout.document(text=enc.encode_ordinary(p)) for p in paragraphs]
    assert [d.tolist() for d in docs] == [d.tolist() for d in expected_docs]
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert (train["paired"], val["paired"], train["text_documents"], train["files"]) == (4, 1, 3, 6)
    assert train["transcription_items"] + val["transcription_items"] == sum(orders.values())
    n_text = sum(len(enc.encode_ordinary(t)) for t in texts.values()) + sum(len(enc.encode_ordinary(p))
                                                                           for p in paragraphs)
    assert train["text_tokens"] + val["text_tokens"] == n_text
    assert train["tokens"] + val["tokens"] == sum(len(d) for d in docs)
    assert train["audio_tokens"] + val["audio_tokens"] == sum(int(((d >= layout.audio_offset) &
                                                                   (d < layout.boundary_id)).sum()) for d in docs)


def test_transcripts_saved_with_a_bom_and_crlf(tmp_path):
    """metadata.csv and name.txt as Windows editors save UTF-8 (a byte-order mark, CRLF line ends): the first
    clip keeps its transcript, and no BOM or CR is left in any text."""
    from prepare_audio import find_transcripts
    (tmp_path / "wavs").mkdir()
    (tmp_path / "metadata.csv").write_bytes("LJ001|First one.|First one.\r\nLJ002|Second.|Second.\r\n"
                                            .encode("utf-8-sig"))
    (tmp_path / "wavs" / "solo.txt").write_bytes("Beside it.\r\n".encode("utf-8-sig"))
    found = find_transcripts(str(tmp_path), ["wavs/LJ001.wav", "wavs/LJ002.wav", "wavs/solo.wav"], "normalized")
    assert found == {"wavs/LJ001.wav": "First one.", "wavs/LJ002.wav": "Second.", "wavs/solo.wav": "Beside it."}


def test_prepare_text_options(transcribed, text_tok):
    """--text_field=raw picks the raw transcripts, --asr_fraction=1 makes every pair a transcription item,
    --strict makes a missing transcript an error; all from the cache, without encoding again."""
    import os
    from test_prepare import run_prepare
    root, out, args, _ = transcribed
    layout, enc = text_tok.layout, text_tok.text
    r = run_prepare(*args, "--text_field=raw", "--asr_fraction=1")
    assert r.returncode == 0, r.stderr
    TS, AE = layout.special("text_start"), layout.special("audio_end")
    docs = read_documents(out, "train", layout)
    paired = [d for d in docs if len(d) > 1 and d[1] == layout.special("audio_start") and TS in d.tolist()]
    assert len(paired) == 4 and all(d.tolist().index(AE) + 1 == d.tolist().index(TS) for d in paired)
    texts = [enc.decode(d[d.tolist().index(TS) + 1:-1].tolist()) for d in paired]
    assert LJ["LJ001-0001"][0] in texts and RAW_C in texts
    r = run_prepare(*args, "--strict=true")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr
    assert errors[0].startswith("error: books/d.wav: no transcript") and "--strict" in errors[0]
    os.remove(os.path.join(root, "books", "d.wav"))  # the rest: only the empty one is left
    r = run_prepare(*args, "--strict=true")
    assert r.returncode == 1 and "error: books/e.wav: empty transcript" in r.stderr


def test_prepare_parquet_transcripts(tmp_path, codec_dir, text_tok):
    """A parquet text column goes into the documents too; a null or empty cell leaves its row audio only."""
    import json
    import os
    import shutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prepare_audio import transcription_first
    from test_prepare import run_prepare
    codec = tmp_path / "codec"  # pre-tokenised codes: the codec's config.json is all that is read
    codec.mkdir()
    shutil.copy(os.path.join(codec_dir, "config.json"), codec / "config.json")
    layout, enc = text_tok.layout, text_tok.text
    rows = [(random_audio(layout, 2, seed=i) - layout.audio_offset, text)
            for i, text in enumerate(["Holmes came.", None, "", "The data.", "You see."])]
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"snac24khz": [a.tolist() for a, _ in rows], "text": [t for _, t in rows]}),
                   tmp_path / "src" / "part-0.parquet", row_group_size=2)
    out = tmp_path / "out"
    r = run_prepare(f"--dataset={tmp_path / 'src'}", f"--codec={codec}", f"--out_dir={out}", "--device=cpu",
                    f"--text_encoding={TEXT_ENCODING}", "--val_files=0", "--asr_fraction=0.5")
    assert r.returncode == 0, r.stderr
    docs = read_documents(str(out), "train", layout)
    expected = []
    for i, (audio_ids, text) in enumerate(rows):
        ids = enc.encode_ordinary(text) if text else None
        first = not transcription_first(1337, f"part-0.parquet row {i}", 0.5)
        # codes arrive as level * codebook + code ids of the audio-only layout; the shards offset them
        codes = Layout((4, 2, 1), CB).tokens_to_codes(audio_ids)
        expected.append(layout.document(audio=layout.codes_to_tokens(codes), text=ids, text_first=first))
    assert [d.tolist() for d in docs] == [e.tolist() for e in expected]
    meta = json.load(open(out / "meta.json"))
    assert meta["untranscribed"] == [{"file": "part-0.parquet row 1", "reason": "no transcript"},
                                     {"file": "part-0.parquet row 2", "reason": "empty transcript"}]
    assert meta["splits"]["train"]["paired"] == 3 and "warning: part-0.parquet row 2: empty transcript" in r.stderr


# -----------------------------------------------------------------------------
# generate.py --text and --transcribe


def run_generate(*args: str, threads: int = 0):
    env = {"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return run_script("generate.py", *args, env=env)


def save_model(path: str, model: GPT, meta: dict) -> str:
    from dataclasses import asdict
    from checkpoints import save_checkpoint
    save_checkpoint(path, {"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta,
                           "iter_num": 0})
    return path


def test_generate_text_and_transcribe_cli(tmp_path, text_tok, tok):
    """Any text+audio checkpoint speaks a sentence into WAVs of whole frames and transcribes files one line each;
    an audio-only checkpoint says in one line that it cannot."""
    import soundfile as sf
    from conftest import synth_audio
    ckpt = save_model(str(tmp_path / "ckpt.pt"), tiny_gpt(text_tok.layout.vocab_size, block_size=96),
                      text_tok.meta())
    r = run_generate(f"--ckpt={ckpt}", "--text=It is a capital mistake.", "--num_samples=2", "--seconds=0.5",
                     f"--out_dir={tmp_path / 'speech'}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert f"speaking {len(text_tok.encode_text('It is a capital mistake.'))} text tokens" in r.stdout
    for i in range(2):
        info = sf.info(str(tmp_path / "speech" / f"sample_{i}.wav"))
        assert info.frames % 2048 == 0 and 0 < info.frames <= 6 * 2048
    sf.write(tmp_path / "a.wav", synth_audio(0.4, 24000), 24000)
    sf.write(tmp_path / "b.flac", synth_audio(3.0, 16000, seed=1), 16000)  # longer than the context: cut, warned
    r = run_generate(f"--ckpt={ckpt}", f"--transcribe={tmp_path / 'a.wav'},{tmp_path / 'b.flac'}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert [line.split(": ")[0] for line in lines] == [str(tmp_path / "a.wav"), str(tmp_path / "b.flac")]
    assert "warning: transcribe" in r.stderr and "b.flac" in r.stderr
    audio_only = save_model(str(tmp_path / "audio.pt"), tiny_gpt(tok.layout.vocab_size), tok.meta())
    r = run_generate(f"--ckpt={audio_only}", "--text=Hello.", "--device=cpu")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "trained on audio only" in r.stderr
    r = run_generate(f"--ckpt={ckpt}", "--text=Hello.", f"--transcribe={tmp_path / 'a.wav'}")
    assert r.returncode == 1 and "separate modes" in r.stderr


def test_text_audio_model_makes_audio_without_its_text_encoding(tmp_path, text_tok):
    """A text+audio checkpoint whose encoding cannot be loaded here (offline, as gpt2's BPE without its cache):
    unconditional and prompted audio run; --text, which encodes text, says in one line that it needs it."""
    import soundfile as sf
    from conftest import synth_audio
    meta = {**text_tok.meta(), "text_encoding": "gpt2o_test_unreachable"}
    ckpt = save_model(str(tmp_path / "ckpt.pt"), tiny_gpt(text_tok.layout.vocab_size, block_size=96), meta)
    sf.write(tmp_path / "a.wav", synth_audio(0.3, 24000), 24000)
    for extra in ([], [f"--prompt={tmp_path / 'a.wav'}"]):
        r = run_generate(f"--ckpt={ckpt}", "--num_samples=1", "--seconds=0.3", f"--out_dir={tmp_path / 'out'}",
                         "--device=cpu", *extra)
        assert r.returncode == 0, r.stderr
        assert sf.info(str(tmp_path / "out" / "sample_0.wav")).frames % 2048 == 0
    r = run_generate(f"--ckpt={ckpt}", "--text=Hello.", f"--out_dir={tmp_path / 'out'}", "--device=cpu")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "gpt2o_test_unreachable" in r.stderr and "needed for --text" in r.stderr


def test_transcription_of_nothing_says_so(tmp_path, text_tok):
    """A model that ends the text at once: the file's line is printed, empty, with a note on stderr."""
    import soundfile as sf
    from conftest import synth_audio
    model = GPT(GPTConfig(vocab_size=text_tok.layout.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32,
                          bias=True)).eval()
    with torch.no_grad():  # every final hidden state is e_0, and TEXT_END's logit along it is far above the others'
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()[0] = 1.0
        model.lm_head.weight[text_tok.layout.special("text_end"), 0] = 100.0
    ckpt = save_model(str(tmp_path / "ckpt.pt"), model, text_tok.meta())
    sf.write(tmp_path / "a.wav", synth_audio(0.3, 24000), 24000)
    r = run_generate(f"--ckpt={ckpt}", f"--transcribe={tmp_path / 'a.wav'}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'a.wav'}: " in r.stdout.splitlines()
    assert "the model wrote no text" in r.stderr


# -----------------------------------------------------------------------------
# the proof that it learns: a tiny model trained by train.py on synthetic pairs speaks and transcribes them back

WORDS = "the woman Holmes mistake data facts observe love mind machine reasoning world capital theories eyes name"
SMALL_CB = 32  # a small codebook keeps the vocab (and so the training) small


def synthetic_items(enc, n: int) -> list[tuple[str, list[int]]]:
    rng, items = np.random.default_rng(0), {}
    while len(items) < n:
        sentence = " ".join(rng.choice(WORDS.split(), size=rng.integers(2, 4), replace=False))
        ids = enc.encode_ordinary(sentence)
        if len(ids) <= 5:
            items[sentence] = ids
    return list(items.items())


def speech_of(ids: list[int], layout: Layout) -> np.ndarray:
    """The audio ids of a text: one frame per text token, its codes a fixed function of the token."""
    frames = np.stack([np.random.default_rng(1000 + t).integers(0, SMALL_CB, layout.frame_size) for t in ids])
    return (frames + layout.frame_lo).reshape(-1)  # (T, frame_size) -> (T * frame_size,)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A small random SNAC (24 kHz strides, 32 codes per level) without decoder noise, with the test encoding."""
    from conftest import SNAC_24KHZ_CONFIG, save_random_snac
    from codec import load_codec
    codec = save_random_snac(str(tmp_path_factory.mktemp("snac_small")), {
        **SNAC_24KHZ_CONFIG, "encoder_dim": 8, "decoder_dim": 16, "codebook_size": SMALL_CB, "noise": False})
    return load_codec(codec, text_encoding=TEXT_ENCODING)


def test_stream_decoder_ends_rows_as_a_stream_end(small_tok):
    """Rows that end at different frames: each one's audio is the one-pass decode of its own frames (no right
    context from what follows the end), then silence; dec.ends says where."""
    layout, fs, hop = small_tok.layout, small_tok.layout.frame_size, small_tok.frame_hop
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, SMALL_CB, (3, 10, fs)) + layout.frame_lo)  # (B, F, fs)
    ends = [3, 7, None]
    for row, end in enumerate(ends):
        if end is not None:
            frames[row, end:] = layout.special("audio_end")
    dec = sampling.StreamDecoder(small_tok, chunk_frames=2)
    pieces = [dec.push(f) for f in frames.reshape(3, -1).split(fs, dim=1)] + [dec.flush()]
    audio = torch.cat([p for p in pieces if p is not None], dim=1)
    assert dec.ends == ends and audio.shape == (3, 10 * hop)
    for row, end in enumerate(ends):
        n = 10 if end is None else end
        one_pass = small_tok.decode_codes(layout.tokens_to_codes(frames[row:row + 1, :n].reshape(1, -1)))[0]
        assert torch.allclose(audio[row, :n * hop], one_pass, atol=1e-5)
        assert (audio[row, n * hop:] == 0).all()


@pytest.mark.slow
def test_tiny_model_learns_to_speak_and_transcribe(tmp_path, small_tok):
    import json
    import soundfile as sf
    import generate
    tok, layout = small_tok, small_tok.layout
    items = synthetic_items(tok.text, 12)
    docs = [layout.document(audio=speech_of(ids, layout), text=ids, text_first=tts)
            for _, ids in items for tts in (True, False)]  # every pair both ways: speech-from-text, transcription
    data = tmp_path / "data"
    data.mkdir()
    order = np.concatenate([np.random.default_rng(r).permutation(len(docs)) for r in range(20)])
    splits = {"train": np.concatenate([docs[i] for i in order]), "val": np.concatenate(docs)}
    shards = []
    for split, stream in splits.items():
        stream.astype("<u2").tofile(data / f"{split}_000.bin")
        shards.append({"file": f"{split}_000.bin", "split": split, "tokens": len(stream), "sources": ["synthetic"]})
    text_tokens = sum(len(ids) for _, ids in items)
    meta = {**tok.meta(), "dtype": "uint16", "dataset": "synthetic", "shards": shards, "skipped": [],
            "splits": {"train": {"tokens": len(splits["train"]), "text_tokens": 40 * text_tokens},
                       "val": {"tokens": len(splits["val"]), "text_tokens": 2 * text_tokens}}}
    (data / "meta.json").write_text(json.dumps(meta))

    out = tmp_path / "out"
    env = {"OMP_NUM_THREADS": "1"}  # a tiny model trains faster on one thread
    r = run_script("train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--compile=False",
                   "--n_layer=2", "--n_head=2", "--n_embd=96", "--block_size=64", "--batch_size=16",
                   "--gradient_accumulation_steps=1", "--learning_rate=3e-3", "--min_lr=3e-4", "--beta2=0.99",
                   "--warmup_iters=20", "--max_iters=600", "--eval_interval=300", "--eval_iters=2",
                   "--log_interval=100", env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    evals = [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in row]
    assert [e["iter"] for e in evals] == [0, 300, 600] and "nats/token" in r.stdout and "bits/byte" in r.stdout
    assert evals[-1]["val_text_loss"] < evals[0]["val_text_loss"] / 5 and evals[-1]["val_text_bpb"] > 0
    assert {"L0", "L1", "L2", "text", "special"} == set(evals[-1]["val_loss_levels"])

    # both directions, through the functions generate.py's --text and --transcribe run, greedy
    model, tok = generate.load_model(generate.GenerateConfig(ckpt=str(out / "ckpt.pt"), text="-"), "cpu",
                                     "float32")  # text: load the text encoding, as --text does
    text_ok = torch.from_numpy(tok.text_bytes > 0)
    spoken = heard = 0
    for sentence, ids in items:
        expected = speech_of(ids, layout)
        context = generate.speech_context(sentence, tok, model.config.block_size)
        generated = sampling.generate_tokens(model, layout, None, len(ids) + 3, temperature=0.0, context=context)
        tokens, kept = sampling.cut_at_end(generated, layout)
        spoken += int(kept[0]) == len(ids) and tokens[0, :len(expected)].tolist() == expected.tolist()
        written = sampling.transcribe(model, layout, torch.from_numpy(expected), 16, text_ok, temperature=0.0)
        heard += tok.decode_text(written) == sentence
    assert spoken >= 0.9 * len(items) and heard >= 0.9 * len(items), (spoken, heard)

    # and the command line: the WAV of --text is the decoded audio of the expected tokens
    sentence, ids = items[0]
    r = run_generate(f"--ckpt={out / 'ckpt.pt'}", f"--text={sentence}", "--num_samples=2", "--temperature=0",
                     "--seconds=2", f"--out_dir={tmp_path / 'speech'}", "--device=cpu", threads=1)
    assert r.returncode == 0, r.stderr
    want = [sampling.decode_in_chunks(tok, torch.from_numpy(speech_of(i, layout))[None])[0].numpy()
            for _, i in items[:2]]
    for i in range(2):
        wav, rate = sf.read(str(tmp_path / "speech" / f"sample_{i}.wav"), dtype="float32")
        assert rate == 24000 and len(wav) == len(want[0]) == len(ids) * 2048
        assert np.abs(wav - np.clip(want[0], -1, 1)).max() <= 2 / 32768  # PCM_16 rounding
        if len(want[1]) == len(wav):  # the control: another sentence's audio is far from it
            assert np.abs(wav - want[1]).max() > 100 / 32768
