"""Conversations: the chat layout (role tokens after the text+audio layout's ids, a loss mask on assistant turns), a
folder of .jsonl conversations with audio as files, base64 bytes and SNAC codes prepared into shards with their loss
masks (resumed after kill -9 byte-identical, bad lines reported), and batches whose user turns the loss ignores."""
import base64
import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from conftest import TEXT_ENCODING, assert_one_line_error, synth_audio, tiny_gpt
from test_prepare import assert_same_output, kill_after_cache_entries, run_prepare
from tokenizer import CHAT_LAYOUT_NAME, Layout

CB = 4096


@pytest.fixture(scope="module")
def chat_layout(text_tok):
    layout = text_tok.layout
    return Layout(layout.vq_strides, layout.codebook_size, layout.text_encoding, layout.text_vocab, chat=True)


def audio_ids(layout: Layout, n_frames: int, seed: int) -> np.ndarray:
    frames = np.random.default_rng(seed).integers(0, CB, (n_frames, layout.frame_size))
    return (frames + layout.frame_lo).reshape(-1)


def test_chat_layout_ids_mask_context_and_reply(chat_layout, text_tok):
    layout, text = chat_layout, text_tok.layout
    assert layout.name == CHAT_LAYOUT_NAME and layout.vocab_size == text.vocab_size + 3
    # every id of the text+audio layout keeps its meaning; the role tokens come after
    assert {k: layout.special_tokens[k] for k in text.special_tokens} == text.special_tokens
    assert [layout.special(r) for r in ("system", "user", "assistant")] == list(range(text.vocab_size,
                                                                                      text.vocab_size + 3))
    assert Layout.from_meta(layout.meta()) == layout
    sp, a, q = layout.special_tokens, audio_ids(layout, 2, 0), audio_ids(layout, 1, 1)
    ids, mask = layout.conversation([("system", [5], None), ("user", None, q), ("assistant", [7, 8], a)])
    reply = [sp["text_start"], 7, 8, sp["text_end"], sp["audio_start"], *a, sp["audio_end"]]
    assert ids.tolist() == [sp["boundary"], sp["system"], sp["text_start"], 5, sp["text_end"], sp["user"],
                            sp["audio_start"], *q, sp["audio_end"], sp["assistant"], *reply]
    assert mask.tolist() == [0] * (len(ids) - len(reply)) + [1] * len(reply)
    ctx = layout.chat_context([("user", [5], None)])
    assert ctx.tolist() == [sp["boundary"], sp["user"], sp["text_start"], 5, sp["text_end"], sp["assistant"],
                            sp["text_start"]]
    words, speech = layout.split_reply(reply[1:] + [sp["user"]])
    assert words.tolist() == [7, 8] and speech.tolist() == a.tolist()
    with pytest.raises(ValueError, match="role 'bot'"):
        layout.turn("bot", [1])
    with pytest.raises(ValueError, match="text encoding"):
        Layout((4, 2, 1), CB, chat=True)


# -----------------------------------------------------------------------------
# a folder of .jsonl conversations

def wav_bytes(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth_audio(seconds, 24000, seed=seed), 24000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, chat_layout):
    d = tmp_path_factory.mktemp("chats")
    (d / "clips").mkdir()
    for i in range(6):
        sf.write(d / "clips" / f"q{i}.wav", synth_audio(0.3, 24000, seed=i), 24000)
    codes = (audio_ids(chat_layout, 2, 9) - chat_layout.audio_offset).tolist()  # flattened, level-offset codes
    b64 = base64.b64encode(wav_bytes(0.3, 7)).decode()
    files = {
        "a.jsonl": [{"messages": [{"role": "user", "audio": "clips/q0.wav"},
                                  {"role": "assistant", "text": "Paris.", "audio": {"codes": codes}}]},
                    {"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                               {"type": "input_audio",
                                                                "input_audio": {"data": b64, "format": "wav"}}]},
                                  {"role": "assistant", "text": "Hello.", "audio": {"path": "clips/q1.wav"}}]},
                    "{not json",
                    {"messages": [{"role": "user", "audio": "clips/missing.wav"},
                                  {"role": "assistant", "text": "No.", "audio": "clips/q2.wav"}]}],
        "b.jsonl": [{"messages": [{"role": "user", "text": "Who?"},
                                  {"role": "assistant", "text": "Holmes.", "audio": "clips/q3.wav"},
                                  {"role": "user", "audio": "clips/q4.wav"},
                                  {"role": "assistant", "text": "Yes.", "audio": {"bytes": b64}}]},
                    {"messages": [{"role": "user", "text": "Only text"}]}],
        "c.jsonl": [{"messages": [{"role": "user", "audio": f"clips/q{i}.wav"},
                                  {"role": "assistant", "text": "Data.", "audio": "clips/q5.wav"}]}
                    for i in range(3)],
    }
    for name, lines in files.items():
        (d / name).write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return d, codes


def read_split(out: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    meta = json.load(open(os.path.join(out, "meta.json")))
    shards = [s for s in meta["shards"] if s["split"] == split]
    ids = np.concatenate([np.fromfile(os.path.join(out, s["file"]), dtype="<u2") for s in shards]).astype(np.int64)
    mask = np.concatenate([np.fromfile(os.path.join(out, s["mask"]), dtype=np.uint8) for s in shards])
    return ids, mask


@pytest.fixture(scope="module")
def chats_prepared(chat_folder, codec_dir, tmp_path_factory):
    d, _ = chat_folder
    out = str(tmp_path_factory.mktemp("chats_out"))
    args = [f"--dataset={d}", f"--codec={codec_dir}", "--device=cpu", f"--text_encoding={TEXT_ENCODING}",
            "--val_files=1", "--shard_tokens=300"]
    r = run_prepare(*args, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out, args, r


def test_jsonl_conversations_prepare(chats_prepared, chat_folder, chat_layout, text_tok, tok):
    out, _, r = chats_prepared
    d, codes = chat_folder
    layout, enc = chat_layout, text_tok.text
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert Layout.from_meta(meta) == layout
    assert [(s["file"], s["row"]) for s in meta["skipped"]] == [("a.jsonl", 2), ("a.jsonl", 3), ("b.jsonl", 1)]
    assert "not JSON" in meta["skipped"][0]["reason"] and "no assistant turn" in meta["skipped"][2]["reason"]
    assert "warning: a.jsonl row 2: not JSON" in r.stderr and "warning: a.jsonl row 3:" in r.stderr

    def enc_audio(path=None, data=None):
        wav, rate = sf.read(io.BytesIO(data) if data else str(d / path), dtype="float32")
        return tok.encode(wav, rate).astype(np.int64) + layout.audio_offset

    b64 = wav_bytes(0.3, 7)
    expected = [
        [("user", None, enc_audio("clips/q0.wav")),
         ("assistant", enc.encode_ordinary("Paris."), np.array(codes) + layout.audio_offset)],
        [("system", enc.encode_ordinary("Be brief."), None), ("user", enc.encode_ordinary("Hi"), enc_audio(data=b64)),
         ("assistant", enc.encode_ordinary("Hello."), enc_audio("clips/q1.wav"))],
        [("user", enc.encode_ordinary("Who?"), None),
         ("assistant", enc.encode_ordinary("Holmes."), enc_audio("clips/q3.wav")),
         ("user", None, enc_audio("clips/q4.wav")), ("assistant", enc.encode_ordinary("Yes."), enc_audio(data=b64))],
        *[[("user", None, enc_audio(f"clips/q{i}.wav")),
           ("assistant", enc.encode_ordinary("Data."), enc_audio("clips/q5.wav"))] for i in range(3)]]
    built = [layout.conversation(c) for c in expected]
    for split, docs in (("val", built[:1]), ("train", built[1:])):
        ids, mask = read_split(out, split)
        assert ids.tolist() == np.concatenate([i for i, _ in docs]).tolist(), split
        assert mask.tolist() == np.concatenate([m for _, m in docs]).tolist(), split
    assert meta["splits"]["train"]["files"] == 5 and meta["splits"]["train"]["assistant_tokens"] == \
        sum(int(m.sum()) for _, m in built[1:])


@pytest.mark.slow
def test_jsonl_conversations_resume_after_kill(chats_prepared, tmp_path):
    ref, args, _ = chats_prepared
    out = str(tmp_path / "again")
    kill_after_cache_entries([*args, f"--out_dir={out}"], out, n=1)
    r = run_prepare(*args, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert_same_output(ref, out)


def test_conversations_need_a_text_encoding(chat_folder, codec_dir, tmp_path):
    d, _ = chat_folder
    r = run_prepare(f"--dataset={d}", f"--codec={codec_dir}", "--device=cpu", "--text_encoding=none",
                    f"--out_dir={tmp_path / 'o'}")
    assert_one_line_error(r, "conversations need a text encoding")


# -----------------------------------------------------------------------------
# the loss counts assistant turns only

def test_loss_ignores_user_turns(chats_prepared, chat_layout):
    from dataset import evaluate, get_batch, load_dataset
    out, _, _ = chats_prepared
    meta, streams = load_dataset(out)
    train = streams["train"]
    block = 48
    starts = np.arange(0, len(train) - block - 1, 17)
    x, y = get_batch(train, starts, block, "cpu", meta["vocab_size"])
    ids, mask = read_split(out, "train")
    want = np.stack([np.where(mask[s + 1:s + block + 1] > 0, ids[s + 1:s + block + 1], -1) for s in starts])
    assert x.tolist() == np.stack([ids[s:s + block] for s in starts]).tolist() and y.tolist() == want.tolist()
    assert (y == -1).any() and (y >= 0).any()
    model = tiny_gpt(meta["vocab_size"], block_size=block)
    with torch.no_grad():
        logits, loss = model(x, y)
        flat, full = logits.view(-1, logits.size(-1)), torch.from_numpy(
            np.stack([ids[s + 1:s + block + 1] for s in starts])).reshape(-1)
        counted = y.reshape(-1) >= 0
        assistant_only = F.cross_entropy(flat[counted], full[counted])
        every_turn = F.cross_entropy(flat, full)
    assert torch.allclose(loss, assistant_only, atol=1e-5) and not torch.allclose(loss, every_turn, atol=1e-3)
    # eval figures: assistant text and assistant audio, over the counted targets alone
    row = evaluate(model, train, starts, block, 8, meta, "cpu", "float32", False)
    groups = chat_layout.groups(full[counted])
    ce = F.cross_entropy(flat[counted], full[counted], reduction="none")
    text = chat_layout.n_levels
    assert abs(row["val_text_loss"] - float(ce[groups == text].mean())) < 1e-4
    assert abs(row["val_audio_loss"] - float(ce[groups < text].mean())) < 1e-4


# -----------------------------------------------------------------------------
# fine-tuning for chat: a text+audio checkpoint grows the role rows and learns to answer spoken questions

SMALL_CB = 32
WORDS = "the woman Holmes mistake data facts observe love mind machine reasoning world capital theories eyes name"


def test_added_rows_rule(chat_layout, text_tok, tok):
    from dataclasses import asdict
    from checkpoints import added_rows, grow_rows
    from model import GPT, GPTConfig
    text_meta, chat_meta = text_tok.layout.meta(), chat_layout.meta()
    assert added_rows(text_meta, chat_meta) == 3 and added_rows(chat_meta, chat_meta) == 0
    with pytest.raises(ValueError, match="layout snac-chat-v1 but the data has layout snac-text-audio-v1"):
        added_rows(chat_meta, text_meta)  # a chat model on data without the role tokens: not the same ids
    with pytest.raises(ValueError, match="layout"):
        added_rows(tok.layout.meta(), chat_meta)  # audio-only ids are other ids
    model = tiny_gpt(text_tok.layout.vocab_size)
    n = text_tok.layout.vocab_size
    state = grow_rows(model.state_dict(), n, n + 3)
    wte, before = state["transformer.wte.weight"], model.state_dict()["transformer.wte.weight"][:n]
    assert wte.shape[0] == model.config.padded_vocab_size and state["lm_head.weight"] is wte  # 12,800 rows
    assert torch.equal(wte[:n], before) and torch.allclose(wte[n + 2], before.mean(0)) and not wte[n + 3:].any()
    grown = GPT(GPTConfig(**{**asdict(model.config), "vocab_size": n + 3}))
    grown.load_state_dict(state)  # loads into a model of the chat layout's vocab


@pytest.mark.slow
def test_tiny_chat_model_answers_spoken_questions(tmp_path_factory, tmp_path):
    import sampling
    from checkpoints import load_checkpoint
    from codec import load_codec
    from conftest import SNAC_24KHZ_CONFIG, run_script, save_random_snac
    from model import GPT
    from test_text import save_model
    codec = save_random_snac(str(tmp_path_factory.mktemp("snac_small")), {
        **SNAC_24KHZ_CONFIG, "encoder_dim": 8, "decoder_dim": 16, "codebook_size": SMALL_CB, "noise": False})
    tok = load_codec(codec, text_encoding=TEXT_ENCODING)
    enc, lo = tok.text, tok.layout.frame_levels * SMALL_CB  # codes of the audio-only layout: level * cb + code
    rng = np.random.default_rng(0)
    qa = []
    while len(qa) < 12:
        answer = " ".join(rng.choice(WORDS.split(), size=2, replace=False))
        ids = enc.encode_ordinary(answer)
        if len(ids) <= 4 and answer not in [a for _, a, _ in qa]:
            question = (rng.integers(0, SMALL_CB, (2, 7)) + lo).reshape(-1).tolist()  # 2 frames of its own
            speech = (np.stack([np.random.default_rng(1000 + t).integers(0, SMALL_CB, 7) for t in ids]) + lo)
            qa.append((question, answer, speech.reshape(-1).tolist()))
    src = tmp_path / "chats"
    src.mkdir()
    lines = [{"messages": [{"role": "user", "audio": {"codes": q}},
                           {"role": "assistant", "text": a, "audio": {"codes": s}}]} for q, a, s in qa]
    order = [i for r in range(15) for i in np.random.default_rng(r).permutation(len(lines))]
    (src / "train.jsonl").write_text("\n".join(json.dumps(lines[i]) for i in [0, *order]) + "\n")
    data = tmp_path / "data"
    r = run_prepare(f"--dataset={src}", f"--codec={codec}", f"--out_dir={data}", "--device=cpu",
                    f"--text_encoding={TEXT_ENCODING}", "--val_files=1")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(data / "meta.json"))
    layout = Layout.from_meta(meta)
    # the checkpoint to fine-tune: a text+audio model (no role tokens), as a TTS run leaves one
    tts = save_model(str(tmp_path / "tts.pt"), tiny_gpt(tok.layout.vocab_size, block_size=96, n_embd=96), tok.meta())
    out = tmp_path / "out"
    r = run_script("train.py", f"--data_dir={data}", f"--out_dir={out}", f"--init_from={tts}", "--device=cpu",
                   "--compile=False", "--batch_size=16", "--gradient_accumulation_steps=1", "--learning_rate=3e-3",
                   "--min_lr=3e-4", "--beta2=0.99", "--warmup_iters=20", "--max_iters=400", "--eval_interval=400",
                   "--eval_iters=1", "--log_interval=200", "--eval_samples=0", "--dropout=0",
                   env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "3 new token rows" in r.stdout
    evals = [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in row]
    assert "val_text_loss" in evals[-1] and "val_audio_loss" in evals[-1]
    text_ok = torch.from_numpy(tok.text_bytes > 0)

    def answered(ckpt: dict) -> int:
        model = GPT.from_checkpoint(ckpt).eval()
        right = 0
        for q, a, s in qa:
            context = layout.chat_context([("user", None, np.array(q) + layout.audio_offset)])
            text, audio = sampling.reply(model, layout, context, 8, 6, text_ok, temperature=0.0)
            right += enc.decode(text) == a and audio.tolist() == (np.array(s) + layout.audio_offset).tolist()
        return right

    right = answered(load_checkpoint(str(out / "ckpt.pt")))
    assert right >= 0.9 * len(qa), right
    # the control: the checkpoint it started from, grown to the chat layout, answers none of them
    start = load_checkpoint(tts)
    from checkpoints import grow_rows
    start = {**start, "model": grow_rows(start["model"], tok.layout.vocab_size, layout.vocab_size),
             "model_args": {**start["model_args"], "vocab_size": layout.vocab_size}}
    assert answered(start) < 0.9 * len(qa)
    print(f"answered {right}/{len(qa)} held-in spoken questions (text and speech)")


# -----------------------------------------------------------------------------
# chat.py through a pipe

def test_chat_cli_three_turns_through_a_pipe(tmp_path, chat_layout, text_tok):
    from conftest import run_script
    from test_text import save_model
    meta = {**text_tok.meta(), **chat_layout.meta()}
    ckpt = save_model(str(tmp_path / "chat.pt"), tiny_gpt(chat_layout.vocab_size, block_size=160), meta)
    sf.write(tmp_path / "question.wav", synth_audio(0.4, 24000), 24000)
    turns = f"Hello there.\n{tmp_path / 'question.wav'}\nThank you.\n"
    out = tmp_path / "replies"
    r = run_script("chat.py", f"--ckpt={ckpt}", "--device=cpu", f"--out_dir={out}", "--seconds=0.5",
                   "--max_text=8", "--system=Be brief.", input=turns, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["reply_0.wav", "reply_1.wav", "reply_2.wav"]
    for i in range(3):
        assert sf.info(str(out / f"reply_{i}.wav")).frames % 2048 == 0
    assert r.stdout.count("assistant:") == 3 and r.stdout.count("time to first audio") == 3
    assert "note: the conversation fills the model's context" in r.stderr  # 160 tokens hold about two turns
    plain = save_model(str(tmp_path / "tts.pt"), tiny_gpt(text_tok.layout.vocab_size), text_tok.meta())
    r = run_script("chat.py", f"--ckpt={plain}", "--device=cpu", f"--out_dir={out}", input="Hi.\n")
    assert_one_line_error(r, "no role tokens", "configs/chat.py")


def test_a_conversation_in_the_kv_cache_replies_as_one_run_from_scratch(chat_layout, text_tok):
    """Three greedy replies through one PrefixCache equal the same replies each prefilled from nothing, while every
    reply after the first finds the conversation so far in the cache; a window that no longer starts the same (the
    oldest turn left) is run whole."""
    from sampling import PrefixCache, reply
    torch.manual_seed(0)
    layout = chat_layout
    model = tiny_gpt(layout.vocab_size, block_size=256).eval()
    cache, turns, ran = PrefixCache(model), [("system", [11, 12], None)], []
    sp = layout.special_tokens
    for turn in range(3):
        turns.append(("user", [20 + turn, 30], None) if turn != 1 else ("user", None, audio_ids(layout, 2, turn)))
        context = torch.from_numpy(layout.chat_context(turns))
        before = cache.ran
        kept = reply(model, layout, context, 6, 3, temperature=0.0, prefix=cache)
        fresh = reply(model, layout, context, 6, 3, temperature=0.0)
        assert kept[0] == fresh[0] and torch.equal(kept[1], fresh[1])
        # the audio's prefill found the context and the reply's text in the cache (TEXT_END too, if it was written)
        assert len(context) + len(kept[0]) <= cache.reused <= len(context) + len(kept[0]) + 1
        ran.append(cache.ran - before)
        turns.append(("assistant", np.asarray(kept[0] or [sp["text_end"] - 1]),
                      kept[1].numpy() if len(kept[1]) else None))
        if turn == 0:
            assert ran[0] == len(context) + 2  # nothing to reuse: the context, then TEXT_END and AUDIO_START
        else:  # the new user turn and the reply's two ids; not the turns before
            new = len(context) - len(layout.chat_context(turns[:-2])) + 2  # user turn, ASSISTANT TEXT_START
            assert ran[-1] <= new + 2 + 2, (ran, new)
    moved = torch.from_numpy(layout.chat_context(turns[:1] + turns[3:]))  # the first exchange left
    before = cache.ran
    reply(model, layout, moved, 6, 3, temperature=0.0, prefix=cache)
    shared = len(layout.conversation(turns[:1])[0]) + 1  # the system turn and the USER after it
    assert cache.ran - before == len(moved) - shared + 2
