"""serve.py's audio chat and uploaded voices: a real uvicorn with a tiny random chat model, driven by the official
openai client and httpx."""
import base64
import io
import json
import threading

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from conftest import TEXT_ENCODING, synth_audio, tiny_gpt
from test_serve import auth, client, launch
from test_text import save_model
from tokenizer import Layout

VOICE = {"voice": "alloy", "format": "wav"}
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, codec_dir):
    """A tiny chat model (the chat layout's role tokens), 2 rows, 2 uploaded voices at most."""
    from codec import load_codec
    tok = load_codec(codec_dir, text_encoding=TEXT_ENCODING)
    t = tok.layout
    layout = Layout(t.vq_strides, t.codebook_size, t.text_encoding, t.text_vocab, chat=True)
    ckpt = save_model(str(tmp_path_factory.mktemp("chat") / "ckpt.pt"), tiny_gpt(layout.vocab_size, block_size=256),
                      {**tok.meta(), **layout.meta(), "codec": codec_dir})
    url, proc, log = launch(ckpt, str(tmp_path_factory.mktemp("log")), "--max_batch=2", "--max_seconds=1",
                            "--max_text=8", "--max_voices=2", "--max_input_chars=200", "--max_upload_mb=1",
                            "--model_name=chat")
    yield url
    proc.terminate()
    proc.wait(30)


def wav_b64(seconds: float, seed: int = 0) -> str:
    out = io.BytesIO()
    sf.write(out, synth_audio(seconds, 16000, seed=seed), 16000, format="WAV")
    return base64.b64encode(out.getvalue()).decode()


def alike(a: str | bytes, b: str | bytes, wav: bool = True) -> bool:
    """The same audio (base64 or bytes, WAV or raw pcm16): sample for sample within 1/32768, as the codec rounds
    chunks decoded at other boundaries (streams gather the frames they find waiting)."""
    a, b = (base64.b64decode(x) if isinstance(x, str) else x for x in (a, b))
    x, y = (sf.read(io.BytesIO(v), dtype="int16")[0] if wav else np.frombuffer(v, "<i2") for v in (a, b))
    return len(x) == len(y) > 0 and int(np.abs(x.astype(int) - y).max()) <= 1


def test_audio_chat_with_the_openai_client(chat_server):
    c = client(chat_server)
    r = c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=VOICE, messages=ASK, seed=1)
    m = r.choices[0].message
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "stop"
    assert m.content is None and isinstance(m.audio.transcript, str) and m.audio.id
    wav, rate = sf.read(io.BytesIO(base64.b64decode(m.audio.data)), dtype="float32")
    assert rate == 24000 and 0 < len(wav) <= 24000 + 2048 and np.isfinite(wav).all()
    again = c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=VOICE, messages=ASK, seed=1)
    assert alike(again.choices[0].message.audio.data, m.audio.data)  # the same seed, the same reply
    # two chats at once share the batch's steps, each with the reply it gets alone
    got: dict[int, str] = {}
    ask = lambda seed: c.chat.completions.create(  # noqa: E731
        model="gpt2o", modalities=["text", "audio"], audio=VOICE, messages=ASK, seed=seed).choices[0].message.audio.data
    threads = [threading.Thread(target=lambda s=s: got.update({s: ask(s)})) for s in (1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got.keys() == {1, 5} and alike(got[1], m.audio.data) and alike(got[5], ask(5))
    assert not alike(got[1], got[5])  # another seed, another reply
    text = c.chat.completions.create(model="chat", messages=ASK, seed=1).choices[0].message
    assert text.content == m.audio.transcript and text.audio is None
    # an input_audio part is heard: its frames are in the context (usage counts them)
    heard = c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=VOICE, seed=1, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello there."},
                                     {"type": "input_audio", "input_audio": {"data": wav_b64(0.4), "format": "wav"}}]}])
    plain = c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=VOICE, seed=1,
                                      messages=ASK[1:])
    assert heard.usage.prompt_tokens - plain.usage.prompt_tokens == 4 * 7 + 2  # 4 frames, AUDIO_START + AUDIO_END
    assert sf.info(io.BytesIO(base64.b64decode(heard.choices[0].message.audio.data))).frames > 0


def test_streamed_chat_gives_the_transcript_then_the_audio(chat_server):
    c = client(chat_server)
    pcm = {"voice": "alloy", "format": "pcm16"}
    whole = c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=pcm, messages=ASK,
                                      seed=2).choices[0].message.audio
    kinds, transcript, data, finish = [], "", b"", None
    for chunk in c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=pcm, messages=ASK,
                                           seed=2, stream=True):
        assert chunk.object == "chat.completion.chunk"
        audio = chunk.choices[0].delta.audio
        if audio is not None and audio.transcript is not None:
            kinds.append("transcript")
            transcript += audio.transcript
        if audio is not None and audio.data is not None:
            kinds.append("data")
            data += base64.b64decode(audio.data)
        finish = chunk.choices[0].finish_reason or finish
    assert whole.transcript and finish == "stop" and "data" in kinds and "transcript" not in kinds[kinds.index("data"):]
    assert transcript.strip() == whole.transcript and alike(data, whole.data, wav=False)
    written = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
        model="gpt2o", messages=ASK, seed=2, stream=True))
    assert written.strip() == whole.transcript  # text only: the same words as content deltas
    with pytest.raises(openai.BadRequestError, match="pcm16"):
        c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], audio=VOICE, messages=ASK, stream=True)


def test_bad_chat_requests_get_400(chat_server):
    def post(**body) -> httpx.Response:
        return httpx.post(f"{chat_server}/v1/chat/completions", headers=auth(), timeout=60,
                          json={"model": "chat", "messages": ASK, **body})
    audio_part = lambda data: [{"type": "input_audio", "input_audio": data}]  # noqa: E731
    cases = [({"modalities": ["audio"]}, "modalities"), ({"modalities": ["text", "audio"]}, "audio"),
             ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
             ({"modalities": ["text", "audio"], "audio": {"voice": "nobody"}}, "voice"),
             ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
             ({"messages": [{"role": "user", "content": "x" * 201}]}, "messages"),
             ({"messages": [{"role": "user", "content": audio_part({"data": "bm90IGF1ZGlv"})}]}, None),
             ({"messages": [{"role": "user", "content": audio_part({"path": "/etc/passwd"})}]}, "messages"),
             ({"messages": [{"role": "user", "content": audio_part({"data": "", "format": "exe"})}]}, "messages"),
             ({"messages": [{"role": "user", "content": audio_part({"data": wav_b64(1.5)})}]}, "messages"),
             ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]}, "messages"),
             ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"seed": -1}, "seed"),
             ({"temperature": -1}, "temperature"), ({"tools": []}, "tools")]
    for body, param in cases:
        r = post(**body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and (param is None or err["param"] == param), (body, err)
    assert "messages[0].content.input_audio" in post(**cases[7][0]).json()["error"]["message"]
    assert "over 1 s here" in post(**cases[10][0]).json()["error"]["message"]
    assert httpx.get(f"{chat_server}/health").status_code == 200


def test_uploaded_voices_speak_list_and_delete(chat_server, text_tok):
    c, url = client(chat_server), chat_server

    def upload(seed: int, name: str = "") -> dict:
        r = httpx.post(f"{url}/v1/audio/voices", headers=auth(), timeout=60, data={"text": "The data.", "name": name},
                       files={"file": ("ref.wav", base64.b64decode(wav_b64(0.5, seed)))})
        assert r.status_code == 200, r.text
        return r.json()

    def speak(voice: str) -> bytes:
        return c.audio.speech.create(model="gpt2o", voice=voice, input="a cat sat",
                                     extra_body={"seed": 3, "max_seconds": 0.5}).content

    def context_ids(voice: str) -> int:  # the ids the speech continued, from the SSE stream's usage
        with httpx.stream("POST", f"{url}/v1/audio/speech", headers=auth(), timeout=60, json={
                "model": "chat", "input": "a cat sat", "voice": voice, "stream_format": "sse", "response_format": "pcm",
                "max_seconds": 0.5, "seed": 3}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "speech.audio.done", events[-1]
        return events[-1]["usage"]["input_tokens"]
    ann, bob = upload(0, "ann"), upload(1)
    assert ann["id"].startswith("voice_") and ann["object"] == "voice" and ann["name"] == "ann"
    assert ann["seconds"] == pytest.approx(5 * 2048 / 24000, abs=1e-3)
    listed = httpx.get(f"{url}/v1/audio/voices", headers=auth()).json()["data"]
    assert [v["id"] for v in listed] == [ann["id"], bob["id"]]
    # the reference is in the context: its 5 frames and its text, as a cloning item (Layout.clone_context)
    ref_text = len(text_tok.encode_text("The data."))
    assert context_ids(ann["id"]) - context_ids("alloy") == 5 * 7 + ref_text + 4
    in_ann = speak(ann["id"])
    assert sf.read(io.BytesIO(in_ann))[0].size > 0 and alike(speak(ann["id"]), in_ann)  # the same seed
    r = c.chat.completions.create(model="gpt2o", modalities=["text", "audio"], messages=ASK, seed=1,
                                  audio={"voice": bob["id"], "format": "wav"})
    assert sf.info(io.BytesIO(base64.b64decode(r.choices[0].message.audio.data))).frames > 0
    # --max_voices=2: a third upload forgets the least recently used (ann was used last, bob goes)
    speak(ann["id"])
    cat = upload(2, "cat")
    assert [v["id"] for v in httpx.get(f"{url}/v1/audio/voices", headers=auth()).json()["data"]] == \
        [ann["id"], cat["id"]]
    with pytest.raises(openai.BadRequestError, match=f"known: {ann['id']}, {cat['id']}"):
        speak(bob["id"])
    gone = httpx.delete(f"{url}/v1/audio/voices/{ann['id']}", headers=auth())
    assert gone.status_code == 200 and gone.json() == {"id": ann["id"], "object": "voice.deleted", "deleted": True}
    assert httpx.delete(f"{url}/v1/audio/voices/{ann['id']}", headers=auth()).status_code == 404
    with pytest.raises(openai.BadRequestError, match=f"voice '{ann['id']}'.*known: {cat['id']}"):
        speak(ann["id"])
    for data, files, param in (({"text": ""}, {"file": ("r.wav", b"RIFF")}, "text"),
                               ({"text": "hi"}, {"file": ("r.wav", b"not audio at all")}, "file"),
                               ({"text": "hi", "path": "/etc"}, {"file": ("r.wav", b"x")}, "path")):
        r = httpx.post(f"{url}/v1/audio/voices", headers=auth(), data=data, files=files)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
