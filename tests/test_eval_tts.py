"""eval_tts.py, metrics.py and evalset.py, offline: tiny random Whisper and WavLM-SV models built from configs (their
numbers mean nothing; the plumbing, the list formats, eval.json and the report are what is checked), and the
normaliser, error rates and SIM on inputs with known answers."""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import assert_one_line_error, run_script, synth_audio, tiny_gpt

import fixtures
from checkpoints import save_checkpoint
from evalset import read_list, round_trip, speak
from tokenizer import Layout
from metrics import Asr, Normaliser, SpeakerEmbedder, error_rates, similarity

BLOCK_SIZE = 192  # room for a sentence and a second or two of audio after a short reference


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> str:
    return fixtures.save_tiny_whisper(str(tmp_path_factory.mktemp("whisper")))


@pytest.fixture(scope="module")
def sv_dir(tmp_path_factory) -> str:
    return fixtures.save_tiny_wavlm_sv(str(tmp_path_factory.mktemp("wavlm_sv")))


@pytest.fixture(scope="module")
def text_model(text_tok):
    return tiny_gpt(text_tok.layout.vocab_size, BLOCK_SIZE)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, text_tok, text_model, codec_dir) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_checkpoint(path, {"model": text_model.state_dict(), "model_args": asdict(text_model.config),
                           "meta": {**text_tok.meta(), "codec": codec_dir}, "iter_num": 0})
    return path


def write_wav(path, seconds: float = 0.5, seed: int = 0, rate: int = 16000) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, synth_audio(seconds, rate, seed=seed), rate)
    return str(path)


def seedtts_list(folder) -> str:
    """A Seed-TTS-eval meta.lst as published (wav paths relative to it): 2 good rows, one with a target recording,
    and 3 bad ones."""
    write_wav(folder / "prompt-wavs" / "a.wav", seed=1)
    write_wav(folder / "prompt-wavs" / "b.wav", seed=2)
    write_wav(folder / "wavs" / "b.wav", seed=3)
    lines = ["a|Prompt one here.|prompt-wavs/a.wav|The birch canoe slid.",
             "b|Prompt two.|prompt-wavs/b.wav|Glue the sheet.|wavs/b.wav",
             "c|Prompt three.|prompt-wavs/missing.wav|No audio for this one.",
             "d|Prompt four.|prompt-wavs/a.wav|   ",
             "e|only three|fields"]
    path = folder / "meta.lst"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -----------------------------------------------------------------------------
# text, error rates and SIM on known answers

def test_normaliser_and_error_rates_on_known_strings():
    norm = Normaliser()
    assert norm.name == "whisper-english (no spelling map)"
    assert norm("Mr. Smith's  COLOUR, isn't it?") == "mister smith is colour is not it"
    assert norm("It costs 10 percent.") == "it costs 10%"
    assert error_rates("The cat, sat!", "the CAT sat", norm) == {"wer": 0.0, "cer": 0.0}
    rates = error_rates("the cat sat", "the cat sat down", norm)  # one word inserted; 5 characters (" down")
    assert rates["wer"] == pytest.approx(1 / 3) and rates["cer"] == pytest.approx(5 / 11)
    assert error_rates("red green blue black", "red grin blue", norm)["wer"] == pytest.approx(2 / 4)  # sub + del
    assert error_rates("twenty one dogs", "21 dogs", norm)["wer"] == 0.0  # numbers are written as digits
    assert error_rates("a b", "", norm)["wer"] == 1.0
    # the spelling map that ships with Whisper's tokenizer: British and American spellings then agree
    spelled = Normaliser({"colour": "color"})
    assert spelled.name == "whisper-english"
    assert error_rates("the colour", "the color", spelled)["wer"] == 0.0
    assert error_rates("the colour", "the color", norm)["wer"] == 0.5
    with pytest.raises(ValueError, match="empty once normalised"):
        error_rates("Hmm, uh. [noise]", "anything", norm)  # fillers and bracketed notes are dropped


def test_sim_of_a_clip_with_itself_is_one(sv_dir):
    sv = SpeakerEmbedder(sv_dir)
    a, b = synth_audio(1.0, 24000, seed=0), synth_audio(1.0, 24000, seed=5)[::-1].copy()
    ea = sv(a, 24000)
    assert ea.shape == (16,) and torch.linalg.norm(ea) == pytest.approx(1.0, abs=1e-5)
    assert similarity(ea, sv(a, 24000)) == pytest.approx(1.0, abs=1e-5)
    assert similarity(ea, sv(b, 24000)) < 1 - 1e-4
    assert similarity(ea, -ea) == pytest.approx(-1.0, abs=1e-5)
    assert sv(a[:10], 24000).shape == (16,)  # a clip shorter than the convolutions' window still has an embedding


def test_asr_transcribes_offline_and_names_a_folder_it_cannot_load(whisper_dir, tmp_path):
    asr = Asr(whisper_dir)
    assert asr.generate_kwargs == {"language": "en", "task": "transcribe", "num_beams": 1} and asr.rate == 16000
    audio = synth_audio(1.0, 24000)
    text = asr(audio, 24000)
    assert isinstance(text, str) and text == asr(audio, 24000)  # greedy: the same text for the same audio
    assert asr(audio[:0], 24000) == ""  # no audio, no words
    with pytest.raises(ValueError, match=f"ASR model {tmp_path}: cannot be loaded"):
        Asr(str(tmp_path))  # a folder with no model in it


# -----------------------------------------------------------------------------
# the lists

def test_seedtts_list_rows_and_bad_rows(tmp_path):
    path = seedtts_list(tmp_path)
    rows, bad, fmt = read_list(path)
    assert fmt == "seedtts" and [r.id for r in rows] == ["a", "b"]
    assert rows[0].ref_wav == str(tmp_path / "prompt-wavs" / "a.wav") and rows[0].ref_text == "Prompt one here."
    assert rows[0].text == "The birch canoe slid." and rows[0].target_wav == ""
    assert rows[1].target_wav == str(tmp_path / "wavs" / "b.wav") and rows[1].where == f"{path}:2"
    assert len(bad) == 3
    assert bad[0].startswith(f"{path}:3: audio file ") and "missing.wav not found" in bad[0]
    assert bad[1] == f"{path}:4: empty target text"
    assert bad[2].startswith(f"{path}:5: 3 |-separated fields; expected 4")


def test_librispeech_pc_list_rows_and_bad_rows(tmp_path):
    root = tmp_path / "LibriSpeech" / "test-clean"
    write_wav(root / "1089" / "134686" / "1089-134686-0000.flac")
    write_wav(root / "1089" / "134686" / "1089-134686-0001.flac", seed=1)
    lines = ["1089-134686-0000\t3.1\tHe hoped there would be stew.\t1089-134686-0001\t5.2\tStuff it into you.",
             "1089-134686-0000\t3.1\tHe hoped.\t1089-134686-0009\t5.0\tNo recording of this one.",
             "1089-134686-0000\t3.1\tHe hoped.\tnot-an-utt\t5.0\tBad name.",
             "1089-134686-0000\t3.1\tfive fields only\t1089-134686-0001\t5.2",
             "1089-134686-0000\t3.1\t\t1089-134686-0001\t5.2\tNo prompt text."]
    path = tmp_path / "librispeech_pc_test_clean_cross_sentence.lst"
    path.write_text("\n".join(lines) + "\n")
    rows, bad, fmt = read_list(str(path), str(root))
    assert fmt == "librispeech_pc" and len(rows) == 1
    row = rows[0]
    assert row.id == "1089-134686-0001" and row.text == "Stuff it into you."
    assert row.ref_wav == str(root / "1089" / "134686" / "1089-134686-0000.flac")
    assert row.target_wav == str(root / "1089" / "134686" / "1089-134686-0001.flac")
    assert row.ref_text == "He hoped there would be stew."
    assert [b.split(": ", 1)[0] for b in bad] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "1089-134686-0009.flac not found" in bad[0] and "<speaker>-<chapter>-<index>" in bad[1]
    assert "5 tab-separated fields; expected 6" in bad[2] and bad[3].endswith("empty prompt text")
    # without audio_root, the utterances are looked up beside the list
    assert read_list(str(path))[0] == []


def test_plain_sentences_list(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("The first sentence.\n\n  The second one.  \n")
    rows, bad, fmt = read_list(str(path))
    assert fmt == "sentences" and bad == []
    assert [(r.id, r.text, r.ref_wav) for r in rows] == [("line1", "The first sentence.", ""),
                                                         ("line3", "The second one.", "")]


# -----------------------------------------------------------------------------
# speech, the ceiling, and the script end to end

def test_speak_with_and_without_a_reference(text_model, text_tok):
    tok = text_tok
    hop = tok.frame_hop
    g = torch.Generator().manual_seed(0)
    audio = speak(text_model, tok, "Hello there.", max_seconds=0.5, generator=g)
    assert audio.dtype == np.float32 and 0 < len(audio) <= 6 * hop and len(audio) % hop == 0
    ref = torch.from_numpy(tok.encode(synth_audio(0.5, tok.sample_rate), tok.sample_rate))
    cloned = speak(text_model, tok, "Hello there.", ref, "A reference.", max_seconds=0.5, generator=g)
    assert 0 < len(cloned) <= 6 * hop and len(cloned) % hop == 0  # the new audio only, not the reference's
    with pytest.raises(ValueError, match="leave no room for audio"):
        speak(text_model, tok, "word " * 300, max_seconds=0.5)


@pytest.mark.slow
def test_eval_tts_end_to_end(ckpt, whisper_dir, sv_dir, text_tok, tmp_path):
    lst = seedtts_list(tmp_path / "seedtts")
    out = tmp_path / "eval"
    args = [f"--ckpt={ckpt}", f"--list={lst}", f"--out_dir={out}", f"--asr={whisper_dir}", f"--sv={sv_dir}",
            "--max_seconds=0.5", "--transcribe=True", "--device=cpu"]
    r = run_script("eval_tts.py", *args, env={"HF_HUB_OFFLINE": "1"}, check=True)
    assert r.stderr.count("; skipped") == 3 and f"{lst}:3: audio file" in r.stderr, r.stderr
    assert "downloading" not in r.stdout  # local folders: nothing to fetch
    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "seedtts" and report["list"] == lst
    assert report["models"] == {"asr": whisper_dir, "asr_beams": 1, "sv": sv_dir, "utmos": None,
                                "normaliser": "whisper-english (no spelling map)", "codec": text_tok.name,
                                "device": "cpu"}
    assert any("utmosv2" in n for n in report["notes"])  # not installed here: said, and the rest runs
    assert len(report["bad_rows"]) == 3 and report["rows_per_minute"] > 0
    rows = report["rows"]
    assert [row["id"] for row in rows] == ["a", "b"]
    for row in rows:
        assert 0 <= row["wer"] and 0 <= row["cer"] and -1 <= row["sim"] <= 1 and isinstance(row["transcript"], str)
        audio, rate = sf.read(row["wav"])
        assert rate == 24000 and len(audio) == round(row["seconds"] * rate) and len(audio) % text_tok.frame_hop == 0
        assert set(row["ceiling"]) >= {"audio", "transcript", "wer", "cer", "sim"}
        assert set(row["model_asr"]) == {"transcript", "wer", "cer"}
    # the ceiling is the reference (or the target recording, where the list has one) after the codec's round trip
    assert rows[0]["ceiling"]["audio"].endswith("a.wav") and rows[1]["ceiling"]["audio"].endswith("wavs/b.wav")
    text_tok.noise_seed = 1337
    ref, rate = sf.read(rows[1]["ceiling"]["audio"], dtype="float32")
    assert rows[1]["ceiling"]["transcript"] == Asr(whisper_dir)(round_trip(text_tok, ref, rate), 24000)
    summary = report["summary"]
    assert summary["rows"] == 2 and summary["wer"] == pytest.approx(np.mean([row["wer"] for row in rows]))
    assert summary["sim"] == pytest.approx(np.mean([row["sim"] for row in rows])) and summary["utmos"] is None
    assert summary["ceiling"]["rows"] == 2 and summary["model_asr"]["rows"] == 2
    table = r.stdout[r.stdout.index("figure"):]
    assert "WER" in table and "SIM" in table and "the model's own ASR" in table and "UTMOS" not in table

    # a second eval into the same out_dir moves the first one's files aside
    r = run_script("eval_tts.py", *args, "--sv=", "--ceiling=False", "--transcribe=False", "--max_rows=1",
                   env={"HF_HUB_OFFLINE": "1"}, check=True)
    old = [d for d in os.listdir(out) if d.startswith("old-")]
    assert len(old) == 1 and json.loads((out / old[0] / "eval.json").read_text())["rows"] == rows
    second = json.loads((out / "eval.json").read_text())
    assert [row["id"] for row in second["rows"]] == ["a"] and "sim" not in second["rows"][0]
    assert "ceiling" not in second["summary"] and second["models"]["sv"] is None


def test_eval_tts_errors_are_one_line(ckpt, tok, codec_dir, tmp_path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("Hello.\n")
    env = {"HF_HUB_OFFLINE": "1"}
    r = run_script("eval_tts.py", f"--ckpt={ckpt}", f"--list={sentences}", f"--out_dir={tmp_path}/e",
                   "--asr=nobody/no-such-asr", "--device=cpu", env=env)
    assert_one_line_error(r, "ASR model nobody/no-such-asr", "hf download nobody/no-such-asr", "--asr=")
    assert "downloading the ASR model nobody/no-such-asr" in r.stdout  # the first-time download, said
    r = run_script("eval_tts.py", f"--ckpt={ckpt}", f"--list={tmp_path}/none.lst", env=env)
    assert_one_line_error(r, "none.lst: not found")
    empty = tmp_path / "bad.lst"
    empty.write_text("x|y|missing.wav|z\n")
    r = run_script("eval_tts.py", f"--ckpt={ckpt}", f"--list={empty}", env=env)
    assert r.returncode == 1 and "bad.lst:1: audio file" in r.stderr and r.stderr.strip().splitlines()[-1] \
        .startswith(f"error: list {empty}: no row to evaluate (1 bad rows")
    audio_only = tmp_path / "audio.pt"
    model = tiny_gpt(tok.layout.vocab_size, 64)
    save_checkpoint(str(audio_only), {"model": model.state_dict(), "model_args": asdict(model.config),
                                      "meta": {**tok.meta(), "codec": codec_dir}, "iter_num": 0})
    r = run_script("eval_tts.py", f"--ckpt={audio_only}", f"--list={sentences}", "--device=cpu", env=env)
    assert_one_line_error(r, "trained on audio only", "text+audio")


@pytest.mark.slow
def test_eval_asr_during_training_logs_wer(whisper_dir, sv_dir, text_tok, codec_dir, tmp_path):
    """train.py's eval_asr: each eval speaks the rows, and log.jsonl and report.html carry their WER (and SIM)."""
    data = tmp_path / "data"
    fixtures.random_dataset(str(data), text_tok.layout, [4000], [1000], codec=codec_dir)
    lst = seedtts_list(tmp_path / "list")
    out = tmp_path / "out"
    args = ["configs/tiny.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--max_iters=2",
            "--eval_interval=2", "--eval_iters=1", "--batch_size=2", "--block_size=128", "--n_layer=1",
            "--n_embd=32", "--n_head=2", "--eval_samples=2", "--eval_sample_seconds=0.3", f"--eval_asr={whisper_dir}",
            f"--eval_sv={sv_dir}", f"--eval_list={lst}"]
    r = run_script("train.py", *args, env={"HF_HUB_OFFLINE": "1"}, check=True)
    assert r.stderr.count("; skipped") == 3, r.stderr
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["iter"] for e in evals] == [0, 2]
    for e in evals:
        assert e["eval_wer"] >= 0 and e["eval_cer"] >= 0 and -1 <= e["eval_sim"] <= 1
        assert 0 < e["asr_s"] < e["sample_s"]  # the scoring's time is part of the samples'

    assert sorted(os.listdir(out / "samples")) == [f"iter00000{i}_tts{j}.wav" for i in (0, 2) for j in (0, 1)]
    page = (out / "report.html").read_text()
    assert "spoken samples: WER" in page and f"WER {evals[-1]['eval_wer'] * 100:.1f}%" in page
    assert "WER" in r.stdout
    # an audio-only dataset cannot speak: said before training starts
    audio = tmp_path / "audio"
    fixtures.random_dataset(str(audio), Layout((4, 2, 1), 4096), [4000], [1000])
    r = run_script("train.py", *args[:1], f"--data_dir={audio}", f"--out_dir={tmp_path}/o2", *args[3:])
    assert_one_line_error(r, f"eval_asr={whisper_dir}", "holds audio only")
    assert not os.path.exists(tmp_path / "o2" / "log.jsonl")

