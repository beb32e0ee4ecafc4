"""Chat data shapes: messages in parquet, gpt-omni/VoiceAssistant-400K's parquet, ICTNLP/InstructS2S-200K's .json,
told apart by chat_shape; mini-omni's frame order converted to SNAC levels; bad rows reported and skipped."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from chats import chat_shape, mini_omni_codes, read_chats
from conftest import synth_audio
from sources import codes_to_tokens
from tokenizer import Layout


def wav_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth_audio(0.3, 24000, seed=seed), 24000, format="WAV")
    return buf.getvalue()


def test_mini_omni_frames_become_our_depth_first_tokens():
    layout = Layout((4, 2, 1), 4096)
    l0, l1, l2 = [10, 11], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37]
    snac = " # ".join(" ".join(map(str, (l0[i], l1[2 * i], l2[4 * i], l2[4 * i + 1], l1[2 * i + 1], l2[4 * i + 2],
                                         l2[4 * i + 3]))) for i in range(2)) + " #"
    assert mini_omni_codes(snac) == (l0, l1, l2)
    tokens = codes_to_tokens(mini_omni_codes(snac), layout) - layout.audio_offset
    want = np.concatenate([np.array(f) + layout.frame_levels * 4096 for f in ([10, 20, 30, 31, 21, 32, 33],
                                                                              [11, 22, 34, 35, 23, 36, 37])])
    assert tokens.tolist() == want.tolist()
    with pytest.raises(ValueError, match="frame 1: '1 2 3' is not 7 integers"):
        mini_omni_codes("1 2 3 4 5 6 7#1 2 3")


def test_voiceassistant_rounds_form_conversations(tmp_path):
    q = {"bytes": wav_bytes(0), "path": "q.wav"}
    frame = "1 2 3 4 5 6 7"
    rows = [("a", 0, 0, frame), ("a", 0, 1, frame), ("a", 1, 0, "1 2"), ("b", 1, 0, f" {frame}#{frame}# ")]
    table = pa.table({"split_name": [r[0] for r in rows], "index": [r[1] for r in rows],
                      "round": [r[2] for r in rows], "question": ["q"] * 4, "question_audio": [q] * 4,
                      "answer": ["Yes  sir."] * 4, "answer_snac": [r[3] for r in rows]})
    pq.write_table(table, tmp_path / "va.parquet")
    assert chat_shape(str(tmp_path / "va.parquet")) == "voiceassistant"
    got = list(read_chats(str(tmp_path / "va.parquet")))
    assert [(n, e[:20]) for n, _, e in got] == [(0, ""), (2, "answer_snac frame 0:"), (3, "")]
    turns = got[0][1]
    pair = [("user", None, "bytes"), ("assistant", "Yes sir.", "codes")]
    assert [(t.role, t.text, t.audio[0]) for t in turns] == pair * 2
    assert len(got[2][1][1].audio[1][0]) == 2  # two frames, the empty ones skipped


def test_instructs2s_and_parquet_messages_and_unknown_shapes(tmp_path):
    records = [{"id": "1", "conversation": [{"from": "human", "value": "Hi", "speech": "q.wav", "unit": "1 2"},
                                            {"from": "gpt", "value": "Hello.", "speech": "a.wav"}]},
               {"id": "2", "conversation": [{"from": "human", "text": "Hi"}, {"from": "gpt", "value": "No audio."}]}]
    (tmp_path / "s2s.json").write_text(json.dumps(records))
    got = list(read_chats(str(tmp_path / "s2s.json")))
    assert [(t.role, t.text, t.audio) for t in got[0][1]] == [
        ("user", None, ("file", str(tmp_path / "q.wav"))), ("assistant", "Hello.", ("file", str(tmp_path / "a.wav")))]
    assert got[1][1] is None and "assistant turn needs its text and its audio" in got[1][2]
    messages = [[{"role": "user", "text": "Hi", "audio": None},
                 {"role": "assistant", "text": "Yo.", "audio": {"bytes": wav_bytes(1), "path": None}}]]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "m.parquet")
    got = list(read_chats(str(tmp_path / "m.parquet")))
    assert [(t.role, t.text, t.audio and t.audio[0]) for t in got[0][1]] == [("user", "Hi", None),
                                                                            ("assistant", "Yo.", "bytes")]
    pq.write_table(pa.table({"messages": [json.dumps([{"role": "user", "text": "x"}])]}), tmp_path / "j.parquet")
    assert list(read_chats(str(tmp_path / "j.parquet"))) == [(0, None, "no assistant turn: nothing to learn from")]
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x.parquet: a chat file with keys/columns question; expected one of"):
        chat_shape(str(tmp_path / "x.parquet"))


def test_voiceassistant_parquet_prepares(tmp_path, codec_dir):
    from conftest import TEXT_ENCODING
    from test_prepare import run_prepare
    (tmp_path / "d").mkdir()
    q = {"bytes": wav_bytes(0), "path": "q.wav"}
    snac = "1 2 3 4 5 6 7#8 9 10 11 12 13 14"
    pq.write_table(pa.table({"split_name": ["a", "a", "b", "c"], "index": [0, 1, 2, 3], "round": [0, 0, 0, 0],
                             "question": ["q"] * 4, "question_audio": [q] * 4, "answer": ["Yes."] * 4,
                             "answer_snac": [snac, snac, "1 2", snac]}), tmp_path / "d" / "va.parquet")
    out = tmp_path / "out"
    r = run_prepare(f"--dataset={tmp_path / 'd'}", f"--codec={codec_dir}", "--device=cpu",
                    f"--text_encoding={TEXT_ENCODING}", "--val_files=1", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(out / "meta.json"))
    assert [(s["file"], s["row"]) for s in meta["skipped"]] == [("va.parquet", 2)]
    assert meta["splits"]["train"]["files"] == 2


def write_shape(shape: str, d) -> int:
    """Three files of one chat shape in folder d, each of two conversations, one of them bad; -> the good ones."""
    d.mkdir()
    for f in range(3):
        q, a = {"bytes": wav_bytes(2 * f), "path": None}, {"bytes": wav_bytes(2 * f + 1), "path": None}
        if shape == "messages":  # audio as raw bytes in the first two files, the answer as SNAC codes in the third
            answer = list(range(f, f + 14)) if f == 2 else a
            rows = [[{"role": "user", "text": "Hi", "audio": None}, {"role": "assistant", "text": "Yo.", "audio":
                     answer}], [{"role": "user", "text": "Only a question.", "audio": None}]]
            if f == 2:
                rows[0][0]["audio"] = list(range(7))  # every turn's audio shares the column's type
            pq.write_table(pa.table({"messages": rows}), d / f"m{f}.parquet")
        elif shape == "voiceassistant":
            pq.write_table(pa.table({"split_name": ["s", "s"], "index": [2 * f, 2 * f + 1], "round": [0, 0],
                                     "question": ["q"] * 2, "question_audio": [q] * 2, "answer": ["Yes."] * 2,
                                     "answer_snac": ["1 2 3 4 5 6 7#8 9 10 11 12 13 14", "1 2"]}),
                           d / f"va{f}.parquet")
        else:
            for i, x in enumerate((q, a)):
                (d / f"{f}_{i}.wav").write_bytes(x["bytes"])
            conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "speech": f"{f}_0.wav", "unit": "3"},
                    {"from": "gpt", "value": "Fine.", "speech": f"{f}_1.wav"}]
            bad = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "No speech."}]
            (d / f"s{f}.json").write_text(json.dumps([{"id": f"{f}a", "conversation": conv},
                                                      {"id": f"{f}b", "conversation": bad}]))
    return 3


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["messages", "voiceassistant", "instructs2s"])
def test_each_chat_shape_prepares_and_resumes_after_kill(shape, tmp_path, codec_dir):
    """Every shape prepares end to end (its bad row in each file reported and skipped), and a run killed after its
    first file resumes to the same bytes."""
    from conftest import TEXT_ENCODING
    from test_prepare import assert_same_output, kill_after_cache_entries, run_prepare
    good = write_shape(shape, tmp_path / "d")
    args = [f"--dataset={tmp_path / 'd'}", f"--codec={codec_dir}", "--device=cpu", f"--text_encoding={TEXT_ENCODING}",
            "--val_files=1", "--shard_tokens=300"]
    ref, out = tmp_path / "ref", tmp_path / "again"
    r = run_prepare(*args, f"--out_dir={ref}")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(ref / "meta.json"))
    assert len(meta["skipped"]) == 3 and all(s["row"] == 1 for s in meta["skipped"]), meta["skipped"]
    assert meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"] == good
    assert meta["splits"]["train"]["assistant_tokens"] > 0
    kill_after_cache_entries([*args, f"--out_dir={out}"], str(out), n=1)
    r = run_prepare(*args, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert_same_output(str(ref), str(out))
