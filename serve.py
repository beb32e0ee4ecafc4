"""Serve a trained model over HTTP: OpenAI's speech and transcription routes, a web page, many listeners at once.

    python serve.py --ckpt=out/ljspeech/best.pt          # http://127.0.0.1:8000/ the page, /docs the API
    python serve.py --ckpt=you/gpt2o-ljspeech --port=8080 --api_key=secret --max_batch=64
    python serve.py --ckpt=out/sherlock/best.pt --codec=snac_24khz_folder --device=cpu   # offline, audio only
    curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
        -d '{"model": "gpt2o", "input": "It is a capital mistake.", "voice": "alloy"}' | ffplay -nodisp -autoexit -
    curl -s localhost:8000/v1/audio/transcriptions -F file=@recording.flac -F model=gpt2o
    curl -s localhost:8000/v1/audio/continuations -F file=@voice.flac -F model=gpt2o -F seconds=10 > more.wav
    curl -s localhost:8000/v1/audio/voices -F file=@ref.wav -F text='What the reference says.'   # -> voice_<hex>
    python serve.py --help

Routes: POST /v1/audio/speech (OpenAI's body; wav or pcm streamed as made, flac when whole, or SSE events),
POST /v1/audio/transcriptions (multipart; json or text), POST /v1/audio/continuations (gpt2o's own: continue an
uploaded recording, or babble unconditionally, for audio-only models too), POST /v1/chat/completions (OpenAI's
audio chat, chat models: text, then speech, whole or as SSE chunks), POST, GET /v1/audio/voices and DELETE
/v1/audio/voices/{id} (uploaded reference voices, held in memory, spoken by id), GET /v1/models, GET /health,
GET / (the page). Errors are OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}. Concurrent
requests share decode steps (batching.py): each joins the batch at the next frame boundary and leaves it when it
ends or its client goes away (a chat reply's text is written between two steps); beyond --max_batch streams
running and --max_queue waiting, a request gets 429 with Retry-After.
SIGTERM stops accepting, lets running streams finish for up to --drain_seconds, then exits.
"""
import asyncio
import base64
import dataclasses
import io
import json
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from batching import Busy, Scheduler, Stream
from codec import BadAudio, pcm16, read_audio, wav_stream_header
from common import UserError, pick_device, pick_dtype, run_main, user_errors
from config import parse_config
from chats import parse_message
from sampling import CODEC_CONTEXT_FRAMES, DECODE_MODES, StreamDecoder, stream_text
from speech import audio_tokens, fit_clone, load_model, transcribe_tokens
from tokenizer import CHAT_LAYOUT_NAME, voice_text


@dataclass
class ServeConfig:
    ckpt: str = "out/sherlock/ckpt.pt"  # a train.py checkpoint (.pt), a folder written by export.py, or a Hub model id
    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 listens on every interface
    port: int = 8000
    api_key: str = ""  # when set, every route but / and /health needs the header "Authorization: Bearer <key>"
    model_name: str = ""  # the model id /v1/models lists ("gpt2o" is accepted too); "" = named after --ckpt
    codec: str = ""  # Hub id or local folder; "" = the codec named in the checkpoint's tokenizer meta
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16 (half precision on CUDA only)
    decode: str = "auto"  # auto: CUDA graphs per batch size on CUDA, eager steps elsewhere; eager; static; graph
    max_batch: int = 8  # streams decoded together in one batch (rows of the KV cache)
    max_queue: int = 16  # requests waiting for a row; beyond: 429 with Retry-After
    max_input_chars: int = 4096  # longest `input` of /v1/audio/speech
    max_seconds: float = 60.0  # longest audio one request gets
    max_upload_mb: float = 25.0  # largest upload (transcriptions, continuations)
    stream_frames: int = 6  # frames per streamed chunk (6 = 0.5 s at 24 kHz): smaller, sooner first audio
    temperature: float = 1.0  # requests' default sampling (a request may set its own temperature, top_k, top_p)
    top_k: int = 0
    top_p: float = 1.0
    drain_seconds: float = 30.0  # on SIGTERM, how long running streams may take to finish
    max_voices: int = 16  # uploaded voices held in memory; beyond, the least recently used one is forgotten
    max_messages: int = 64  # messages of one chat request
    max_text: int = 256  # text tokens of one chat reply (a request's max_completion_tokens at most)


OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
AUDIO_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}
CHAT_FORMATS = {"wav": "wav", "pcm16": "pcm", "flac": "flac"}  # a chat request's audio.format -> AudioEncoder's
INPUT_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "aiff")  # input_audio.format: what libsndfile reads


# -----------------------------------------------------------------------------
# errors in OpenAI's shape

class APIError(Exception):
    """A request's error as OpenAI words it: HTTP status, message, the field (param) and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


@dataclass
class Voice:
    """An uploaded reference: its SNAC ids (whole frames) and the text it says, spoken again by clone_context."""
    id: str
    name: str
    audio: np.ndarray
    text: str
    seconds: float
    created_at: int


def resolve_voice(voice: object, voices: tuple[str, ...] = ("default",),
                  uploaded: "OrderedDict[str, Voice] | None" = None) -> "str | Voice":
    """The one place a request's voice is read: a voice name (or OpenAI's {"id": name}) -> the voice to speak in, a
    trained voice's name or an uploaded Voice ("voice_<hex>", marked as used). A model without speakers has one
    voice, "default", and OpenAI's voice names are aliases of it, so unmodified clients work."""
    name = voice.get("id") if isinstance(voice, dict) else voice
    if not isinstance(name, str) or not name:
        raise APIError(400, "voice: expected a voice name", "voice")
    if name.startswith("voice_") and uploaded is not None:
        if name not in uploaded:
            raise APIError(400, f"voice '{name}' is not an uploaded voice here (POST /v1/audio/voices); known: "
                                f"{', '.join(uploaded) or 'none'}", "voice", "invalid_voice")
        uploaded.move_to_end(name)  # least recently used first: the one --max_voices forgets
        return uploaded[name]
    if name in voices:
        return name
    if name.lower() in OPENAI_VOICES and len(voices) == 1:
        return voices[0]
    raise APIError(400, f"voice '{name}' is not one of this model's voices: {', '.join(voices)} (or OpenAI's "
                        f"names: {', '.join(OPENAI_VOICES)})", "voice", "invalid_voice")


# -----------------------------------------------------------------------------
# audio out: each format as bytes that can be sent as soon as they are made

class AudioEncoder:
    """Float audio chunks -> the bytes of one response_format: wav (16-bit, an open-ended header as generate.py
    --stream_to=- writes) and pcm (raw 16-bit little-endian, as OpenAI's pcm) chunk by chunk, as they come; flac
    whole at the end, as its header holds the length (libsndfile cannot read a FLAC stream of unknown length)."""

    def __init__(self, fmt: str, sample_rate: int):
        self.fmt, self.sample_rate, self.parts = fmt, sample_rate, []
        self.first = wav_stream_header(sample_rate) if fmt == "wav" else b""

    def chunk(self, audio: np.ndarray) -> bytes:
        if self.fmt == "flac":
            self.parts.append(audio)
            return b""
        head, self.first = self.first, b""
        return head + pcm16(audio)

    def end(self) -> bytes:
        if self.fmt != "flac":
            return self.first
        import soundfile as sf
        out = io.BytesIO()
        sf.write(out, np.concatenate(self.parts or [np.zeros(0, np.float32)]), self.sample_rate, format="FLAC",
                 subtype="PCM_16")
        return out.getvalue()


# -----------------------------------------------------------------------------
# the engine: the model, the codec and the scheduler behind every route

class Engine:
    def __init__(self, model, tok, cfg: ServeConfig, name: str):
        self.model, self.tok, self.cfg, self.name = model, tok, cfg, name
        self.layout = tok.layout
        graphs = {"auto": None, "graph": True}.get(cfg.decode, False)
        self.sched = Scheduler(model, tok.layout, cfg.max_batch, cfg.max_queue, graphs=graphs)
        self.codec_lock = threading.Lock()  # the codec's noise settings are shared: one encode or decode at a time
        self.thread = threading.Thread(target=self.sched.run, name="scheduler", daemon=True)
        self.ready = False
        self.voices: OrderedDict[str, Voice] = OrderedDict()  # uploaded, least recently used first

    def add_voice(self, name: str, audio: np.ndarray, text: str) -> Voice:
        """Hold an uploaded reference in memory; beyond --max_voices the least recently used one is forgotten."""
        while len(self.voices) >= self.cfg.max_voices:
            self.voices.popitem(last=False)
        fs = self.layout.frame_size
        audio = audio[-(self.model.config.block_size // fs) * fs:]  # more never fits a context
        vid = f"voice_{secrets.token_hex(12)}"
        seconds = len(audio) // fs * self.tok.frame_hop / self.tok.sample_rate
        self.voices[vid] = Voice(vid, name or vid, audio, text, round(seconds, 3), int(time.time()))
        return self.voices[vid]

    def speech_context(self, text: str, voice: "str | Voice") -> torch.Tensor:
        """What speaking `text` in `voice` continues: a speech item (a trained voice's name before the text), or a
        cloning item after an uploaded reference (speech.fit_clone, as generate.py --prompt_text)."""
        ids = self.tok.encode_text(text if isinstance(voice, Voice) or not self.tok.voices else
                                   voice_text(text, voice))
        try:
            if isinstance(voice, Voice):
                ctx, _ = fit_clone(self.layout, voice.audio, self.tok.encode_text(voice.text), ids,
                                   self.model.config.block_size)
            else:
                ctx = self.layout.speech_context(ids)
                if len(ctx) + 2 * self.layout.frame_size > self.model.config.block_size:
                    raise ValueError(f"{len(ctx) - 4} text tokens leave no room for audio in the model's context "
                                     f"of {self.model.config.block_size} tokens")
        except ValueError as e:
            raise APIError(400, f"input: {e}", "input", "input_too_long") from None
        return torch.from_numpy(ctx)

    def start(self) -> None:
        """Capture the frame graphs and run the codec once (kernels, handles), then start the scheduler."""
        self.sched.warm_up()
        n = self.cfg.stream_frames + CODEC_CONTEXT_FRAMES  # the first chunk of a stream
        codes = torch.from_numpy(self.layout.frame_lo).repeat(n)[None]
        self.tok.decode_codes(self.layout.tokens_to_codes(codes.to(self.tok.device)))
        self.thread.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self.sched.stop()
        self.thread.join(timeout=30)

    def n_frames(self, seconds: float) -> int:
        return max(1, math.ceil(seconds * self.tok.sample_rate / self.tok.frame_hop))

    def codec(self, fn: Callable, seed: int):
        with self.codec_lock:
            self.tok.noise_seed = seed
            out = fn()
            return out.cpu() if isinstance(out, torch.Tensor) else out

    def open(self, context: torch.Tensor, n_frames: int, knobs: tuple[float, int, float], seed: int):
        """Queue a stream (429 when the queue is full); -> (the stream, the asyncio queue its frames arrive on)."""
        loop, frames = asyncio.get_running_loop(), asyncio.Queue()
        # a row is held while its listener listens: the stream runs at most about two chunks ahead of its decoding
        ahead = 2 * (self.cfg.stream_frames + CODEC_CONTEXT_FRAMES)
        stream = Stream(context, n_frames, lambda x: loop.call_soon_threadsafe(frames.put_nowait, x),
                        *knobs, seed=seed, max_ahead=ahead)
        try:
            self.sched.submit(stream)
        except Busy as e:
            raise APIError(429, f"the server is busy ({e}); try again in a moment", None, "rate_limit_exceeded",
                           "rate_limit_error", {"Retry-After": "1"}) from None
        return stream, frames

    async def audio(self, stream: Stream, frames: asyncio.Queue, seed: int,
                    prompt: torch.Tensor | None = None) -> AsyncIterator[np.ndarray]:
        """The stream's audio, float32 chunks as the decoder releases them, up to where the model ended it. prompt:
        the frames before (their last few are decoded as context, and their audio skipped)."""
        dec, hop = StreamDecoder(self.tok, self.cfg.stream_frames), self.tok.frame_hop
        fs = self.layout.frame_size
        skip = 0
        if prompt is not None and len(prompt):
            tail = prompt[-CODEC_CONTEXT_FRAMES * fs:][None]
            skip = tail.shape[1] // fs * hop
            await run_in_threadpool(self.codec, lambda: dec.push(tail.to(self.tok.device)), seed)
        done = 0  # samples of the stream given out or skipped so far
        try:
            while True:
                items = [await frames.get()]
                while not frames.empty():
                    items.append(frames.get_nowait())
                new = [x for x in items if isinstance(x, torch.Tensor)]
                stream.took(len(new))
                last = items[-1]
                if isinstance(last, Exception):
                    raise last
                pieces = []
                if new:
                    pieces.append(await run_in_threadpool(self.codec, lambda: dec.push(torch.cat(new)[None]), seed))
                if last is None:
                    pieces.append(await run_in_threadpool(self.codec, dec.flush, seed))
                for piece in pieces:
                    if piece is None:
                        continue
                    audio = piece[0].numpy()
                    end = dec.ends[0] * hop if dec.ends and dec.ends[0] is not None else len(audio) + done
                    audio = audio[max(0, skip - done):max(0, end - done)]
                    done += piece.shape[1]
                    # a small first chunk for an early first audio, then larger ones: each chunk decodes
                    # CODEC_CONTEXT_FRAMES more on each side, a cost that larger chunks spread thinner
                    dec.chunk = 4 * self.cfg.stream_frames
                    if len(audio):
                        yield audio
                if last is None:
                    return
        finally:
            stream.cancel()  # a client that went away frees its row at the next frame

    async def transcribe(self, tokens: torch.Tensor, temperature: float, seed: int) -> str:
        generator = torch.Generator(device=self.sched.device).manual_seed(seed)
        future = self.sched.call(lambda: transcribe_tokens(self.model, self.tok, tokens, temperature=temperature,
                                                           generator=generator))
        text, _ = await asyncio.wrap_future(future)
        return text

    async def write(self, context: torch.Tensor, max_tokens: int, temperature: float,
                    seed: int) -> AsyncIterator[list[int]]:
        """The text ids the model writes after context (ending with TEXT_START), a few at a time as they are
        sampled: in the scheduler's thread, between two frames of the batch, as transcriptions are."""
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        generator = torch.Generator(device=self.sched.device).manual_seed(seed)
        text_ok = torch.from_numpy(self.tok.text_bytes > 0)

        def run() -> None:
            for ids in stream_text(self.model, self.layout, context, max_tokens, text_ok, temperature=temperature,
                                   generator=generator):
                loop.call_soon_threadsafe(out.put_nowait, ids)
        job = asyncio.wrap_future(self.sched.call(run))
        job.add_done_callback(lambda _: out.put_nowait(None))  # after every id: both come through the loop in order
        while (ids := await out.get()) is not None:
            yield ids
        await job  # its error, if it failed

    async def upload_tokens(self, data: bytes, field: str = "file") -> torch.Tensor:
        """An uploaded audio file's bytes -> the ids of its whole frames (400 naming the field if not audio)."""
        try:
            wav, rate = read_audio(data)
        except BadAudio as e:
            raise APIError(400, f"{field}: {e}; expected WAV, FLAC, OGG, MP3 or another format libsndfile reads",
                           field, "invalid_audio") from None
        return await run_in_threadpool(self.codec, lambda: audio_tokens(self.tok, wav, rate), 0)


def respond_audio(engine: Engine, chunks: AsyncIterator[np.ndarray], fmt: str, stream_format: str,
                  input_tokens: int = 0):
    """The response streaming a request's audio: the bytes of fmt, or OpenAI's SSE events of them (the last with
    the usage: input_tokens, the context's ids, and the audio ids made)."""
    enc = AudioEncoder(fmt, engine.tok.sample_rate)

    async def body() -> AsyncIterator[bytes]:
        seconds = 0.0
        async for audio in chunks:
            seconds += len(audio) / engine.tok.sample_rate
            data = enc.chunk(audio)
            if data:
                yield sse("speech.audio.delta", audio=base64.b64encode(data).decode()) if stream_format == "sse" \
                    else data
        data = enc.end()
        if stream_format == "sse":
            if data:
                yield sse("speech.audio.delta", audio=base64.b64encode(data).decode())
            out = round(seconds * engine.tok.sample_rate) // engine.tok.frame_hop * engine.layout.frame_size
            yield sse("speech.audio.done", seconds=round(seconds, 3), usage={
                "input_tokens": input_tokens, "output_tokens": out, "total_tokens": input_tokens + out})
        elif data:
            yield data
    media = "text/event-stream" if stream_format == "sse" else AUDIO_TYPES[fmt]
    return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-store"})


def sse(kind: str, **fields) -> bytes:
    return f"data: {json.dumps({'type': kind, **fields})}\n\n".encode()


class SpeechRequest(BaseModel):
    """OpenAI's body of /v1/audio/speech, and gpt2o's sampling fields; any other field is refused."""
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str
    voice: str | dict = "default"
    response_format: str = "wav"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: str = "audio"
    # gpt2o's own fields (OpenAI's clients send them with extra_body)
    seed: int | None = Field(None, description="the same seed gives the same audio")
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_seconds: float | None = Field(None, description="at most this much audio (the server's --max_seconds at most)")


class ChatRequest(BaseModel):
    """OpenAI's body of /v1/chat/completions (audio chat), and gpt2o's seed; any other field is refused."""
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[dict]
    modalities: list[str] = Field(default_factory=lambda: ["text"])
    audio: dict | None = None
    stream: bool = False
    stream_options: dict | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, description="for the reply's text (default 0, greedy)")
    seed: int | None = None


# -----------------------------------------------------------------------------
# the app: one function per route; another route is one more function on `v1`

def check_model(engine: Engine, model: str) -> None:
    if model not in (engine.name, "gpt2o"):
        raise APIError(404, f"model '{model}' does not exist here: this server has '{engine.name}' (or 'gpt2o')",
                       "model", "model_not_found")


def check_format(fmt: str, stream_format: str) -> None:
    if fmt not in AUDIO_TYPES:
        raise APIError(400, f"response_format '{fmt}' is not supported here: use {', '.join(AUDIO_TYPES)}",
                       "response_format")
    if stream_format not in ("audio", "sse"):
        raise APIError(400, f"stream_format '{stream_format}': expected audio or sse", "stream_format")


def check_knobs(temperature: float, top_k: int, top_p: float, seconds: float, cfg: ServeConfig,
                seconds_field: str = "seconds") -> None:
    for ok, field, want in ((temperature >= 0, "temperature", ">= 0 (0 = greedy)"), (top_k >= 0, "top_k", ">= 0"),
                            (0 < top_p <= 1, "top_p", "in (0, 1]"),
                            (0 < seconds <= cfg.max_seconds, seconds_field, f"in (0, {cfg.max_seconds}] here")):
        if not ok:
            raise APIError(400, f"{field}: must be {want}", field)


def build_app(engine: Engine, cfg: ServeConfig, server_state: dict) -> FastAPI:
    app = FastAPI(title="gpt2o", version="1", description="Speech from a GPT-2 trained on SNAC audio tokens: "
                  "OpenAI's audio routes, and continuations for audio-only models.")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        names = [x for x in err.get("loc", ()) if isinstance(x, str) and x not in ("body", "query", "form")]
        param = names[-1] if names and err.get("type") != "json_invalid" else None
        return error_response(APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(APIError(e.status_code, str(e.detail), kind=kind, headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        print(f"error: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error_response(APIError(500, f"internal error ({type(e).__name__}); the server goes on",
                                       kind="server_error"))

    def auth(request: Request) -> None:
        if cfg.api_key and not secrets.compare_digest(request.headers.get("authorization", ""),
                                                      f"Bearer {cfg.api_key}"):
            raise APIError(401, "invalid API key: send the header Authorization: Bearer <key>", None,
                           "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    def seed_of(seed: int | None) -> int:
        if seed is not None and not 0 <= seed < 2 ** 32:
            raise APIError(400, "seed: must be in [0, 2**32)", "seed")
        return secrets.randbelow(2 ** 32) if seed is None else seed

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "gpt2o"}]}

    @v1.post("/audio/speech", summary="Speak a text (text+audio models), streamed as it is made")
    async def speech(req: SpeechRequest):
        check_model(engine, req.model)
        if not engine.layout.text_vocab:
            raise APIError(400, f"model '{engine.name}' is trained on audio only: it cannot read text; use "
                                "/v1/audio/continuations", "input")
        if not req.input.strip():
            raise APIError(400, "input: nothing to speak", "input")
        if len(req.input) > cfg.max_input_chars:
            raise APIError(400, f"input: {len(req.input)} characters, at most {cfg.max_input_chars} here", "input",
                           "input_too_long")
        voice = resolve_voice(req.voice, engine.tok.voices or ("default",), engine.voices)
        if req.speed != 1.0:
            raise APIError(400, f"speed={req.speed}: only 1.0 is supported", "speed")
        if req.instructions:
            raise APIError(400, "instructions: not supported by this model", "instructions")
        check_format(req.response_format, req.stream_format)
        knobs = (cfg.temperature if req.temperature is None else req.temperature,
                 cfg.top_k if req.top_k is None else req.top_k, cfg.top_p if req.top_p is None else req.top_p)
        seconds = cfg.max_seconds if req.max_seconds is None else req.max_seconds
        check_knobs(*knobs, seconds, cfg, "max_seconds")
        context = engine.speech_context(req.input, voice)
        seed = seed_of(req.seed)
        stream, frames = engine.open(context, engine.n_frames(seconds), knobs, seed)
        return respond_audio(engine, engine.audio(stream, frames, seed), req.response_format, req.stream_format,
                             len(context))

    async def read_upload(request: Request, file: UploadFile | None, allowed: set[str]) -> bytes | None:
        extra = set((await request.form()).keys()) - allowed
        if extra:
            raise APIError(400, f"{sorted(extra)[0]}: not a field this route takes ({', '.join(sorted(allowed))})",
                           sorted(extra)[0])
        if file is None:
            return None
        data = await file.read()
        if not data:
            raise APIError(400, "file: empty upload", "file")
        return data

    @v1.post("/audio/transcriptions", summary="The model's own transcription of an audio file (text+audio models)")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                             response_format: str = Form("json"), temperature: float = Form(0.0)):
        data = await read_upload(request, file, {"file", "model", "response_format", "temperature"})
        check_model(engine, model)
        if not engine.layout.text_vocab:
            raise APIError(400, f"model '{engine.name}' is trained on audio only: it cannot write text", "model")
        if response_format not in ("json", "text"):
            raise APIError(400, f"response_format '{response_format}' is not supported here: use json or text",
                           "response_format")
        check_knobs(temperature, 0, 1.0, cfg.max_seconds, cfg)
        text = await engine.transcribe(await engine.upload_tokens(data), temperature, 0)
        return PlainTextResponse(text) if response_format == "text" else {"text": text}

    @v1.post("/audio/continuations", summary="Continue a recording, or babble unconditionally (any model)",
             description="gpt2o's route for what OpenAI has no word for. Multipart form: `file` (optional: without "
                         "it the model starts from nothing), `seconds` of new audio, `prompt_seconds` (keep only "
                         "the end of the recording; 0 = all that fits the context), and the sampling fields. The "
                         "new audio streams back as it is made, without the prompt's.")
    async def continuations(request: Request, model: str = Form(...), file: UploadFile | None = File(None),
                            seconds: float = Form(10.0), prompt_seconds: float = Form(0.0),
                            response_format: str = Form("wav"), stream_format: str = Form("audio"),
                            temperature: float | None = Form(None), top_k: int | None = Form(None),
                            top_p: float | None = Form(None), seed: int | None = Form(None)):
        data = await read_upload(request, file, {"file", "model", "seconds", "prompt_seconds", "response_format",
                                                 "stream_format", "temperature", "top_k", "top_p", "seed"})
        check_model(engine, model)
        check_format(response_format, stream_format)
        knobs = (cfg.temperature if temperature is None else temperature, cfg.top_k if top_k is None else top_k,
                 cfg.top_p if top_p is None else top_p)
        check_knobs(*knobs, seconds, cfg)
        if prompt_seconds < 0:
            raise APIError(400, "prompt_seconds: must be >= 0 (0 = all of it that fits)", "prompt_seconds")
        prompt = torch.zeros(0, dtype=torch.long)
        if data is not None:
            prompt = await engine.upload_tokens(data)
            keep = engine.n_frames(prompt_seconds) * engine.layout.frame_size if prompt_seconds > 0 else len(prompt)
            prompt = prompt[-keep:]
        context = torch.cat([torch.from_numpy(engine.layout.audio_context()), prompt])
        seed = seed_of(seed)
        stream, frames = engine.open(context, engine.n_frames(seconds), knobs, seed)
        return respond_audio(engine, engine.audio(stream, frames, seed, prompt), response_format, stream_format,
                             len(context))

    async def chat_turns(messages: list[dict]) -> list[tuple]:
        """OpenAI's messages -> (role, text ids, audio ids) turns: text, or input_audio parts (base64 bytes only:
        never a path); a developer message is a system turn, an assistant's earlier audio is left out."""
        if not 1 <= len(messages) <= cfg.max_messages:
            raise APIError(400, f"messages: {len(messages)} messages, expected 1 to {cfg.max_messages} here",
                           "messages")
        turns, chars = [], 0
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            role = m.get("role") if isinstance(m, dict) else None
            parts = m.get("content") if isinstance(m, dict) else None
            for part in parts if isinstance(parts, list) else []:
                given = part.get("input_audio") if isinstance(part, dict) else None
                fmt = given.get("format") if isinstance(given, dict) else None
                if fmt is not None and fmt not in INPUT_FORMATS:
                    raise APIError(400, f"{where}.content: input_audio format '{fmt}', expected one of "
                                        f"{', '.join(INPUT_FORMATS)}", "messages")
            try:
                turn = parse_message({"role": "system" if role == "developer" else role, "content": parts}, where,
                                     "")
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            if turn.audio is not None and turn.audio[0] != "bytes":
                raise APIError(400, f"{where}.content: input_audio takes {{\"data\": base64, \"format\"}}",
                               "messages")
            chars += len(turn.text or "")
            if chars > cfg.max_input_chars:
                raise APIError(400, f"messages: over {cfg.max_input_chars} characters of text here", "messages",
                               "input_too_long")
            audio = None
            if turn.audio is not None and turn.role != "assistant":
                audio = (await engine.upload_tokens(turn.audio[1], f"{where}.content.input_audio")).numpy()
                if len(audio) > engine.n_frames(cfg.max_seconds) * engine.layout.frame_size:
                    raise APIError(400, f"{where}.content.input_audio: over {cfg.max_seconds:g} s here", "messages",
                                   "input_too_long")
            text = engine.tok.encode_text(turn.text) if turn.text else None
            if text is not None or audio is not None:
                turns.append((turn.role, text, audio))
        return turns

    @v1.post("/chat/completions", summary="Answer a conversation in text, or text then speech (chat models)",
             description="OpenAI's audio chat body: `messages` (text and `input_audio` parts), `modalities`, "
                         "`audio` {voice, format: wav, pcm16 or flac; pcm16 when streamed}, `stream`, "
                         "`max_completion_tokens`, `temperature` (the text's; 0 = greedy), `seed`. The reply "
                         "speaks on from the conversation; an uploaded voice (voice_<hex>) speaks its text in the "
                         "reference's voice.")
    async def chat(req: ChatRequest):
        check_model(engine, req.model)
        layout, fs, block = engine.layout, engine.layout.frame_size, engine.model.config.block_size
        if not layout.chat:
            raise APIError(400, f"model '{engine.name}' has no role tokens (layout {layout.name}): chat needs a "
                                f"model fine-tuned on conversations ({CHAT_LAYOUT_NAME}: train.py configs/chat.py)",
                           "model")
        if req.modalities not in (["text"], ["text", "audio"], ["audio", "text"]):
            raise APIError(400, f"modalities {req.modalities}: expected [\"text\"] or [\"text\", \"audio\"]",
                           "modalities")
        speak = "audio" in req.modalities
        audio = req.audio or {}
        if speak and not req.audio:
            raise APIError(400, "audio: modalities asks for audio: give {\"voice\", \"format\"}", "audio")
        fmt = audio.get("format", "wav")
        if speak and fmt not in CHAT_FORMATS:
            raise APIError(400, f"audio.format '{fmt}' is not supported here: use {', '.join(CHAT_FORMATS)}",
                           "audio")
        if speak and req.stream and fmt != "pcm16":
            raise APIError(400, f"audio.format '{fmt}': a streamed reply's audio is pcm16", "audio")
        voice = resolve_voice(audio.get("voice"), engine.tok.voices or ("default",), engine.voices) if speak \
            else None
        max_text = cfg.max_text if req.max_completion_tokens is None else req.max_completion_tokens
        if not 1 <= max_text <= cfg.max_text:
            raise APIError(400, f"max_completion_tokens: must be in [1, {cfg.max_text}] here",
                           "max_completion_tokens")
        temperature = 0.0 if req.temperature is None else req.temperature
        check_knobs(temperature, 0, 1.0, cfg.max_seconds, cfg)
        seed = seed_of(req.seed)
        # room for the reply: its text, TEXT_END + AUDIO_START and a frame of speech (chat.py's rule)
        room = max_text + 2 + fs
        turns = layout.fit_turns(await chat_turns(req.messages), room, block)
        context = torch.from_numpy(layout.chat_context(turns))
        if len(context) + 2 + 2 * fs > block:
            raise APIError(400, f"messages: the last turn ({len(context)} tokens) leaves no room for a reply in the "
                                f"model's context of {block} tokens", "messages", "input_too_long")
        written = engine.write(context, min(max_text, block - len(context) - 2 - fs), temperature, seed)
        cid, aid, created = f"chatcmpl-{secrets.token_hex(12)}", f"audio_{secrets.token_hex(12)}", int(time.time())

        def spoken(text: list[int]):
            """The reply's speech: the conversation continued after its text, or the text in an uploaded voice."""
            sp = layout.special_tokens
            ctx = engine.speech_context(engine.tok.decode_text(text), voice) if isinstance(voice, Voice) else \
                torch.cat([context, torch.tensor([*text, sp["text_end"], sp["audio_start"]])])
            n = min(engine.n_frames(cfg.max_seconds), (block - len(ctx)) // fs)  # the window must not slide
            stream, frames = engine.open(ctx, max(1, n), (cfg.temperature, cfg.top_k, cfg.top_p), seed)
            return engine.audio(stream, frames, seed)

        def usage(text: list[int], samples: int) -> dict:
            out = len(text) + samples // engine.tok.frame_hop * fs
            return {"prompt_tokens": len(context), "completion_tokens": out, "total_tokens": len(context) + out}

        if not req.stream:
            text = [i async for ids in written for i in ids]
            transcript = engine.tok.decode_text(text).strip()
            message = {"role": "assistant", "content": transcript}
            samples = 0
            if speak:
                enc = AudioEncoder(CHAT_FORMATS[fmt], engine.tok.sample_rate)
                data = []
                async for piece in spoken(text):
                    samples += len(piece)
                    data.append(enc.chunk(piece))
                data.append(enc.end())
                message = {"role": "assistant", "content": None, "audio": {
                    "id": aid, "data": base64.b64encode(b"".join(data)).decode(), "expires_at": created + 3600,
                    "transcript": transcript}}
            return {"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage(text, samples)}

        def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n".encode()

        async def body() -> AsyncIterator[bytes]:
            text: list[int] = []
            yield chunk({"role": "assistant", **({"audio": {"id": aid}} if speak else {"content": ""})})
            async for ids in written:
                shown = engine.tok.decode_text(text)
                text += ids
                piece = engine.tok.decode_text(text)[len(shown):]
                yield chunk({"audio": {"transcript": piece}} if speak else {"content": piece})
            samples = 0
            if speak:
                try:
                    async for piece in spoken(text):
                        samples += len(piece)
                        yield chunk({"audio": {"data": base64.b64encode(pcm16(piece)).decode()}})
                except APIError as e:  # the status is sent already: OpenAI's error event
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n".encode()
                    return
            yield chunk({}, "stop", usage=usage(text, samples))
            yield b"data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    def voice_json(v: Voice) -> dict:
        return {"id": v.id, "object": "voice", "name": v.name, "text": v.text, "seconds": v.seconds,
                "created_at": v.created_at}

    @v1.post("/audio/voices", summary="Upload a reference voice (audio + what it says), spoken again by its id",
             description="Multipart form: `file` (the reference audio), `text` (what it says), `name` (optional). "
                         "The reference is encoded once and held in memory: beyond --max_voices the least recently "
                         "used voice is forgotten. Pass the returned id as `voice` to /v1/audio/speech or "
                         "/v1/chat/completions.")
    async def add_voice(request: Request, file: UploadFile = File(...), text: str = Form(...),
                        name: str = Form("")):
        data = await read_upload(request, file, {"file", "text", "name"})
        if not engine.layout.text_vocab:
            raise APIError(400, f"model '{engine.name}' is trained on audio only: it cannot clone a voice from "
                                "text", "file")
        if not text.strip() or len(text) > cfg.max_input_chars:
            raise APIError(400, f"text: what the reference says, 1 to {cfg.max_input_chars} characters", "text")
        if len(name) > 64:
            raise APIError(400, "name: at most 64 characters", "name")
        tokens = await engine.upload_tokens(data)
        return voice_json(engine.add_voice(name, tokens.numpy(), " ".join(text.split())))

    @v1.get("/audio/voices", summary="The model's trained voices and the uploaded ones")
    async def list_voices():
        trained = [{"id": v, "object": "voice", "name": v, "trained": True} for v in engine.tok.voices]
        return {"object": "list", "data": trained + [voice_json(v) for v in engine.voices.values()]}

    @v1.delete("/audio/voices/{voice_id}", summary="Forget an uploaded voice")
    async def delete_voice(voice_id: str):
        if engine.voices.pop(voice_id, None) is None:
            raise APIError(404, f"voice '{voice_id}' is not an uploaded voice here; known: "
                                f"{', '.join(engine.voices) or 'none'}", "voice_id", "voice_not_found")
        return {"id": voice_id, "object": "voice.deleted", "deleted": True}

    app.include_router(v1)

    @app.get("/health", summary="200 once the model and codec are loaded and warmed up; 503 otherwise")
    async def health():
        ready = engine.ready and not server_state.get("draining")
        body = {"status": "ok" if ready else "draining" if engine.ready else "loading", "model": engine.name,
                "text": bool(engine.layout.text_vocab), "sample_rate": engine.tok.sample_rate,
                "active": engine.sched.active, "waiting": len(engine.sched.waiting),
                "max_batch": cfg.max_batch, "max_seconds": cfg.max_seconds, "auth": bool(cfg.api_key)}
        return JSONResponse(body, status_code=200 if ready else 503)

    page = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html"), encoding="utf-8").read()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app


class UploadLimit:
    """Refuses an upload over max_bytes before its body is read (413), in OpenAI's error shape: a plain ASGI
    wrapper, which leaves streaming responses and disconnects alone."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            size = headers.get(b"content-length")
            error = None
            if size is None and b"multipart" in headers.get(b"content-type", b""):
                error = APIError(411, "an upload needs a Content-Length header", "file")
            elif size is not None and (not size.isdigit() or int(size) > self.max_bytes):
                error = APIError(413, f"file: the upload is over {self.max_bytes / 1e6:g} MB (--max_upload_mb)",
                                 "file", "file_too_large")
            if error is not None:
                return await error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)


def model_name(ckpt: str) -> str:
    """The id /v1/models gives a checkpoint: its run folder's name (out/sherlock/best.pt -> sherlock), an export
    folder's name, or the Hub id."""
    path = os.path.abspath(ckpt)
    if os.path.isfile(path):
        return os.path.basename(os.path.dirname(path)) or "gpt2o"
    return os.path.basename(path.rstrip("/")) if os.path.isdir(path) else ckpt


def check_config(cfg: ServeConfig) -> None:
    checks = ((1 <= cfg.port <= 65535, "port", "in 1..65535"), (cfg.max_batch >= 1, "max_batch", ">= 1"),
              (cfg.max_queue >= 0, "max_queue", ">= 0"), (cfg.max_input_chars >= 1, "max_input_chars", ">= 1"),
              (0 < cfg.max_seconds <= 3600, "max_seconds", "in (0, 3600]"),
              (cfg.max_upload_mb > 0, "max_upload_mb", "> 0"), (cfg.stream_frames >= 1, "stream_frames", ">= 1"),
              (cfg.temperature >= 0, "temperature", ">= 0 (0 = greedy)"), (cfg.top_k >= 0, "top_k", ">= 0"),
              (0 < cfg.top_p <= 1, "top_p", "in (0, 1]"), (cfg.drain_seconds >= 0, "drain_seconds", ">= 0"),
              (cfg.max_voices >= 1, "max_voices", ">= 1"), (cfg.max_messages >= 1, "max_messages", ">= 1"),
              (cfg.max_text >= 1, "max_text", ">= 1"))
    for ok, key, want in checks:
        if not ok:
            raise UserError(f"{key}={getattr(cfg, key)}: must be {want}")
    if cfg.decode not in DECODE_MODES or cfg.decode == "compile":
        raise UserError(f"decode={cfg.decode}: expected auto, eager, static or graph")


def main() -> None:
    with user_errors():
        cfg = parse_config(ServeConfig, sys.argv[1:], __doc__)
    check_config(cfg)
    print("config:", json.dumps({**dataclasses.asdict(cfg), "api_key": "***" if cfg.api_key else ""}), flush=True)
    import uvicorn
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.decode == "graph" and not device.startswith("cuda"):
        raise UserError(f"decode=graph captures CUDA graphs, the device is {device}: use auto, eager or static")
    try:  # before the minutes of loading: is the address ours to take?
        with socket.create_server((cfg.host, cfg.port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pass another --port or --host")
    with user_errors():
        model, tok = load_model(cfg.ckpt, cfg.codec, device, dtype, text_for="the speech and transcription routes")
    engine = Engine(model, tok, cfg, cfg.model_name or model_name(cfg.ckpt))
    engine.start()
    state: dict = {}
    app = UploadLimit(build_app(engine, cfg, state), int(cfg.max_upload_mb * 1e6))
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=cfg.drain_seconds))
    layout = "text+audio" if tok.layout.text_vocab else "audio only"
    print(f"serving {engine.name} ({layout}, {device}, max_batch {cfg.max_batch}) on http://{cfg.host}:{cfg.port}/",
          flush=True)
    handle_exit = server.handle_exit

    def draining(sig, frame) -> None:  # /health says 503 from the first SIGTERM on
        state["draining"] = True
        handle_exit(sig, frame)
    server.handle_exit = draining
    # uvicorn drains on SIGTERM and Ctrl-C, then raises the signal again for the handler it found: a drained
    # server is a clean exit, so that handler does nothing
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run()
    finally:
        engine.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    run_main(main)
