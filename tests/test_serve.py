"""serve.py: a real uvicorn on 127.0.0.1 with a tiny random model, driven by the official openai client, httpx and
headless Chromium."""
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from checkpoints import save_checkpoint
from conftest import ROOT, TEXT_ENCODING, synth_audio, tiny_gpt

KEY = "sekret"
MAX_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ckpt: str, log_dir: str, *args: str):
    """A serve.py process on a free port, ready (its /health says 200) -> (url, process, log path)."""
    port = free_port()
    log = open(os.path.join(log_dir, "server.log"), "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={port}",
                             "--device=cpu", f"--api_key={KEY}", *args],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, open(log.name).read()
        time.sleep(0.2)
    else:
        pytest.fail("the server did not get ready:\n" + open(log.name).read())
    return url, proc, log.name


@pytest.fixture(scope="module")
def server(tmp_path_factory, codec_dir):
    """One server for the module: a tiny text+audio model, 2 rows, 1 waiting request at most."""
    from codec import load_codec
    tok = load_codec(codec_dir, text_encoding=TEXT_ENCODING)
    model = tiny_gpt(tok.layout.vocab_size, block_size=256)
    ckpt = str(tmp_path_factory.mktemp("run") / "ckpt.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": asdict(model.config),
                           "meta": {**tok.meta(), "codec": codec_dir}, "iter_num": 0})
    url, proc, log = launch(ckpt, str(tmp_path_factory.mktemp("log")), "--max_batch=2", "--max_queue=1",
                            "--max_input_chars=200", f"--max_seconds={MAX_SECONDS}", "--max_upload_mb=1",
                            "--model_name=tiny", "--drain_seconds=60")
    yield url, proc, log
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def wav_of(url: str, seconds: float = 0.5, seed: int = 0, fmt: str = "wav", text: str = "a cat sat") -> bytes:
    r = httpx.post(f"{url}/v1/audio/speech", headers=auth(), timeout=120,
                   json={"model": "tiny", "input": text, "voice": "alloy", "response_format": fmt,
                         "max_seconds": seconds, "seed": seed})
    assert r.status_code == 200, r.text
    return r.content


def wait_for(url: str, pred, timeout: float = 30.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        h = httpx.get(f"{url}/health").json()
        if pred(h):
            return h
        time.sleep(0.05)
    pytest.fail(f"health never got there: {h}")


# -----------------------------------------------------------------------------
# the official openai client

def test_openai_client_speech_transcription_and_errors(server):
    url, _, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    with c.audio.speech.with_streaming_response.create(model="gpt2o", voice="alloy", input="the dog ran",
                                                       response_format="wav", extra_body={"max_seconds": 1.0,
                                                                                          "seed": 3}) as r:
        data = b"".join(r.iter_bytes())
    wav, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24000 and 0 < len(wav) <= 24000 + 2048 and np.isfinite(wav).all()
    assert wav_of(url, 1.0, 3, text="the dog ran") == data  # the same seed, the same bytes
    text = c.audio.transcriptions.create(model="gpt2o", file=("speech.wav", data))
    assert isinstance(text.text, str)
    assert isinstance(c.audio.transcriptions.create(model="tiny", file=("speech.wav", data), response_format="text"),
                      str)
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="at most 200 here"):
        c.audio.speech.create(model="gpt2o", voice="alloy", input="x" * 201)
    with pytest.raises(openai.BadRequestError, match="voice 'nobody'"):
        c.audio.speech.create(model="gpt2o", voice="nobody", input="hi")
    with pytest.raises(openai.NotFoundError, match="model 'tts-1' does not exist"):
        c.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    with pytest.raises(openai.BadRequestError, match="response_format 'mp3'"):
        c.audio.speech.create(model="gpt2o", voice="alloy", input="hi", response_format="mp3")
    with pytest.raises(openai.BadRequestError, match="instructions"):
        c.audio.speech.create(model="gpt2o", voice="alloy", input="hi", instructions="whisper")
    with pytest.raises(openai.BadRequestError, match="model 'tiny' has no role tokens"):
        c.chat.completions.create(model="gpt2o", messages=[{"role": "user", "content": "hi"}])


def test_formats_sse_and_continuations(server):
    url, _, _ = server
    pcm = wav_of(url, 0.5, 1, "pcm")
    wav = wav_of(url, 0.5, 1, "wav")
    assert wav[44:] == pcm and len(pcm) % 2 == 0 and len(pcm) > 0  # the same samples, with and without a header
    flac, rate = sf.read(io.BytesIO(wav_of(url, 0.5, 1, "flac")), dtype="int16")
    samples = np.frombuffer(pcm, "<i2").astype(int)
    assert rate == 24000 and len(flac) == len(samples) and np.abs(flac - samples).max() <= 1  # FLAC rounds, WAV floors
    with httpx.stream("POST", f"{url}/v1/audio/speech", headers=auth(), timeout=120,
                      json={"model": "tiny", "input": "a cat sat", "response_format": "pcm", "stream_format": "sse",
                            "max_seconds": 0.5, "seed": 1}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm
    # continue an upload, and from nothing: the new audio only, of the length asked for
    prompt = io.BytesIO()
    sf.write(prompt, synth_audio(0.5, 16000), 16000, format="WAV")
    for files in ({"file": ("p.wav", prompt.getvalue())}, None):
        r = httpx.post(f"{url}/v1/audio/continuations", headers=auth(), timeout=120, files=files,
                       data={"model": "tiny", "seconds": "0.5", "seed": "2"})
        assert r.status_code == 200, r.text
        audio, rate = sf.read(io.BytesIO(r.content))
        assert rate == 24000 and 0 < len(audio) <= 6 * 2048


# -----------------------------------------------------------------------------
# many clients, limits and failures

def test_concurrent_clients_disconnect_and_queue_limit(server):
    url, _, _ = server
    results: dict[int, bytes] = {}

    def one(k: int) -> None:
        results[k] = wav_of(url, 0.5, k)
    threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]  # 2 rows: the third waits its turn
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2]
    for k, data in results.items():
        wav, rate = sf.read(io.BytesIO(data))
        assert rate == 24000 and len(wav) > 0
        assert data == wav_of(url, 0.5, k)  # served alone, the same bytes

    # two long streams hold both rows, a third waits, a fourth is refused with Retry-After
    long = {"model": "tiny", "seconds": str(MAX_SECONDS), "response_format": "pcm"}
    with httpx.Client(timeout=120, headers=auth()) as h:
        streams = [h.stream("POST", f"{url}/v1/audio/continuations", data={**long, "seed": str(s)})
                   for s in (11, 12, 13)]
        responses = [s.__enter__() for s in streams]
        assert [r.status_code for r in responses] == [200, 200, 200]
        flowing = responses[0].iter_raw()  # kept: a dropped iterator would close its response
        assert next(flowing)  # audio is flowing
        wait_for(url, lambda s: s["active"] == 2 and s["waiting"] == 1)
        with pytest.raises(openai.RateLimitError):
            client(url).audio.speech.create(model="gpt2o", voice="alloy", input="hi")
        refused = h.post(f"{url}/v1/audio/continuations", data=long)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # a client that goes away frees its row: the waiting request takes it
        streams[0].__exit__(None, None, None)
        t0 = time.time()
        wait_for(url, lambda s: s["active"] == 2 and s["waiting"] == 0, timeout=10)
        assert time.time() - t0 < 10
        for s in streams[1:]:
            s.__exit__(None, None, None)
    wait_for(url, lambda s: s["active"] == 0 and s["waiting"] == 0, timeout=10)


def test_malformed_requests_get_4xx_and_the_server_goes_on(server):
    url, proc, _ = server
    post = lambda path, **kw: httpx.post(f"{url}{path}", headers={**auth(), **kw.pop("headers", {})},  # noqa: E731
                                         timeout=60, **kw)
    cases = [
        (post("/v1/audio/speech", content=b"{not json", headers={"Content-Type": "application/json"}), 400, None),
        (post("/v1/audio/speech", json={"model": "tiny"}), 400, "input"),
        (post("/v1/audio/speech", json={"model": "tiny", "input": "hi", "bogus": 1}), 400, "bogus"),
        (post("/v1/audio/speech", json={"model": "tiny", "input": "hi", "speed": 2}), 400, "speed"),
        (post("/v1/audio/speech", json={"model": "tiny", "input": "hi", "max_seconds": 1e9}), 400, "max_seconds"),
        (post("/v1/audio/transcriptions", content=b"--xyz\r\ngarbage",
              headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400, "file"),
        (post("/v1/audio/transcriptions", files={"file": ("x.wav", os.urandom(4000))}, data={"model": "tiny"}),
         400, "file"),
        (post("/v1/audio/transcriptions", files={"file": ("x.wav", b"")}, data={"model": "tiny"}), 400, "file"),
        (post("/v1/audio/transcriptions", files={"file": ("x.wav", b"1")}, data={"model": "tiny", "language": "en"}),
         400, "language"),
        (post("/v1/audio/transcriptions", files={"file": ("x.wav", os.urandom(2_000_000))},
              data={"model": "tiny"}), 413, "file"),
        (post("/v1/audio/continuations", data={"model": "tiny", "seconds": "-1"}), 400, "seconds"),
        (httpx.get(f"{url}/v1/nothing", headers=auth()), 404, None),
        (httpx.get(f"{url}/v1/models"), 401, None),
    ]
    for r, status, param in cases:
        assert r.status_code == status, (r.request.url, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, err
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and proc.poll() is None
    assert httpx.get(f"{url}/").text.startswith("<!doctype html>") and "<script src" not in httpx.get(f"{url}/").text
    assert "/v1/audio/continuations" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_bad_settings_are_one_line(tmp_path):
    from conftest import assert_one_line_error, run_script
    assert_one_line_error(run_script("serve.py", "--max_batch=0"), "max_batch=0")
    assert_one_line_error(run_script("serve.py", f"--ckpt={tmp_path / 'none.pt'}", "--device=cpu",
                                     f"--port={free_port()}"), "none.pt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_script("serve.py", f"--port={port}", "--device=cpu"), f"127.0.0.1:{port}")


# -----------------------------------------------------------------------------
# the page in headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.slow
def test_page_speaks_and_transcribes_in_chromium(server, tmp_path):
    if not CHROMIUM or not os.path.exists(DRIVER):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium or chromedriver is not installed; .ci/run installs them with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver); CI installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, proc, _ = server
    if proc.poll() is not None:
        pytest.skip("the module's server has stopped")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "model tiny" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "text").clear()
        driver.find_element(By.ID, "text").send_keys("a cat sat")
        driver.find_element(By.ID, "seed").send_keys("4")
        driver.find_element(By.ID, "speaksec").clear()
        driver.find_element(By.ID, "speaksec").send_keys("1")
        driver.find_element(By.ID, "say").click()
        wait.until(lambda d: d.execute_script("return document.getElementById('speakaudio').duration > 0"))
        assert "time to first audio" in driver.find_element(By.ID, "speakfig").text
        assert "real-time factor" in driver.find_element(By.ID, "speakfig").text
        clip = tmp_path / "clip.wav"
        sf.write(str(clip), synth_audio(0.5, 16000), 16000)
        driver.find_element(By.ID, "hearfile").send_keys(str(clip))
        wait.until(lambda d: d.find_element(By.ID, "transcript").text not in ("", "..."))
        assert driver.find_element(By.ID, "error").text == ""
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_sigterm_drains_then_exits(server):
    """Last in the module: a stream in flight when SIGTERM comes is finished, /health says draining, exit 0."""
    url, proc, log = server
    got: dict = {"data": b""}
    terminated = threading.Event()

    def listen() -> None:  # a slow listener: the server runs a stream only about a second ahead of it
        with httpx.stream("POST", f"{url}/v1/audio/speech", headers=auth(), timeout=120,
                          json={"model": "tiny", "input": "a cat sat", "voice": "alloy", "response_format": "wav",
                                "max_seconds": 10.0, "seed": 5}) as r:
            for chunk in r.iter_bytes():
                got["data"] += chunk
                terminated.wait(60)
    t = threading.Thread(target=listen)
    t.start()
    wait_for(url, lambda s: s["active"] == 1)
    proc.terminate()
    terminated.set()
    t.join(60)
    assert proc.wait(60) == 0, open(log).read()
    wav, _ = sf.read(io.BytesIO(got["data"]))
    assert len(wav) > 0
