"""Score a text+audio checkpoint the way TTS papers do: WER/CER of an ASR transcript, speaker similarity, UTMOS,
each beside its ceiling (the same figure on the reference audio after a codec encode/decode round trip).

    python eval_tts.py --ckpt=out/ljspeech/best.pt --list=seedtts_testset/en/meta.lst --out_dir=eval/seedtts
    python eval_tts.py --ckpt=out/ljspeech/best.pt --list=librispeech_pc_test_clean_cross_sentence.lst \\
        --audio_root=LibriSpeech/test-clean --out_dir=eval/librispeech
    python eval_tts.py --ckpt=out/ljspeech/best.pt --list=sentences.txt --sv= --out_dir=eval/mine   # no references
    python eval_tts.py --ckpt=out/ljspeech/best.pt --list=meta.lst --transcribe=True   # + the model's own ASR WER
    python eval_tts.py --ckpt=out/ljspeech/best.pt --list=meta.lst --asr=whisper-large-v3 --sv=wavlm-sv  # offline
    python eval_tts.py --help

Writes out_dir/eval.json (per row and summary, with the models and normaliser used) and out_dir/wav/<id>.wav, and
prints a table. WER and CER are per row after Whisper's English normaliser, then averaged over rows, as
Seed-TTS-eval and F5-TTS do; SIM is the cosine of speaker-verification embeddings of the output and the reference.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from codec import BadAudio, WavWriters, read_audio
from common import UserError, move_aside, pick_device, pick_dtype, run_main, user_errors, write_json
from config import parse_config
from evalset import audio_tokens, model_transcript, read_list, round_trip, speak
from metrics import (DEFAULT_ASR, DEFAULT_SV, Asr, Normaliser, SpeakerEmbedder, Utmos, error_rates,
                     is_local_or_cached, similarity)
from sampling import DECODE_MODES
import speech


@dataclass
class EvalConfig:
    ckpt: str = "out/ljspeech/best.pt"  # a text+audio checkpoint (.pt), a folder written by export.py, or a Hub id
    list: str = ""  # the rows: Seed-TTS-eval meta.lst, F5-TTS's LibriSpeech-PC list, or one sentence a line
    out_dir: str = "eval"  # eval.json and wav/<id>.wav; an earlier eval's are moved to out_dir/old-<time>/
    audio_root: str = ""  # LibriSpeech-PC: the test-clean folder (<spk>/<chapter>/<utt>.flac); "" = the list's
    asr: str = DEFAULT_ASR  # Hub id or local folder of a Whisper (or other transformers ASR) model
    language: str = "en"  # the ASR's language (multilingual Whisper); the normaliser is English
    asr_beams: int = 1  # the ASR's beam search: 1 = greedy, as Seed-TTS-eval; F5-TTS's faster-whisper uses 5
    sv: str = DEFAULT_SV  # Hub id or local folder of a speaker-verification model (WavLM x-vectors); "" = no SIM
    utmos: bool = True  # UTMOS where the utmosv2 package is installed (skipped with a note where it is not)
    ceiling: bool = True  # the same figures on the reference audio after a codec encode/decode round trip
    transcribe: bool = False  # also the model's own ASR: its transcript of each reference against the reference text
    max_rows: int = 0  # evaluate the first N good rows; 0 = all
    max_seconds: float = 20.0  # audio per row at most (the model ends its audio earlier)
    temperature: float = 1.0  # audio sampling, as generate.py's
    top_k: int = 0  # keep only the k most likely codes; 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    seed: int = 1337  # one generator for the whole list: the same seed, the same audio
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps (the model, the codec, the ASR and SV models)
    dtype: str = "auto"  # the model's weights: auto, float32, bfloat16, float16
    codec: str = ""  # Hub id or local folder; "" = the codec named in the checkpoint
    decode: str = "auto"  # sampling's decode steps (see generate.py)


FIGURES = ("wer", "cer", "sim", "utmos")


def check_config(cfg: EvalConfig) -> None:
    if not cfg.list:
        raise UserError("list is empty: pass --list=<Seed-TTS meta.lst, LibriSpeech-PC .lst, or a text file>")
    if not os.path.isfile(cfg.list):
        raise UserError(f"list {cfg.list}: not found (pass --list=<a list file>)")
    if cfg.audio_root and not os.path.isdir(cfg.audio_root):
        raise UserError(f"audio_root {cfg.audio_root}: not a folder (LibriSpeech's test-clean folder)")
    if not 0 < cfg.max_seconds <= 600:
        raise UserError(f"max_seconds={cfg.max_seconds}: must be > 0 and at most 600")
    for key, ok, rule in (("max_rows", cfg.max_rows >= 0, ">= 0 (0 = all)"),
                          ("asr_beams", 1 <= cfg.asr_beams <= 16, "in 1 .. 16 (1 = greedy)"),
                          ("temperature", cfg.temperature >= 0, ">= 0 (0 = greedy)"),
                          ("top_k", cfg.top_k >= 0, ">= 0 (0 = off)"), ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
                          ("seed", 0 <= cfg.seed < 2 ** 32, "in [0, 2**32)")):
        if not ok:
            raise UserError(f"{key}={getattr(cfg, key)}: must be {rule}")
    if cfg.decode not in DECODE_MODES:
        raise UserError(f"decode={cfg.decode}: expected one of {', '.join(DECODE_MODES)}")
    if not cfg.asr:
        raise UserError("asr is empty: pass --asr=<Hub id or local folder of a Whisper model>")
    if not cfg.out_dir:
        raise UserError("out_dir is empty: pass --out_dir=<folder for eval.json and the WAV files>")


def load_model(cfg: EvalConfig, device: str, dtype: str):
    """The checkpoint and its codec with the text encoding: a text+audio model, or one line saying why not."""
    with user_errors():
        model, tok = speech.load_model(cfg.ckpt, cfg.codec, device, dtype, "eval_tts.py", cfg.seed)
    if not tok.layout.text_vocab:
        raise UserError(f"checkpoint {cfg.ckpt}: trained on audio only (layout {tok.layout.name}); eval_tts.py needs "
                        "a model trained on text+audio data (prepare_audio.py with transcripts)")
    return model, tok


def load_scorers(cfg: EvalConfig, device: str) -> tuple[Asr, SpeakerEmbedder | None, Utmos | None, list[str]]:
    """The ASR, SV and UTMOS models (a first download is said in one line); notes on what is off and why."""
    notes = []
    for what, source in (("ASR", cfg.asr), ("speaker-verification", cfg.sv)):
        if source and not is_local_or_cached(source):
            print(f"downloading the {what} model {source} into the Hugging Face cache (once)", flush=True)
    with user_errors():
        asr = Asr(cfg.asr, device, cfg.language, cfg.asr_beams)
        sv = SpeakerEmbedder(cfg.sv, device) if cfg.sv else None
    utmos = None
    if cfg.utmos:
        try:
            utmos = Utmos(device)
        except ValueError as e:
            notes.append(str(e))
    if not cfg.sv:
        notes.append("SIM is off (--sv=)")
    return asr, sv, utmos, notes


def score(audio: np.ndarray, rate: int, text: str, asr: Asr, norm: Normaliser, sv: SpeakerEmbedder | None,
          ref_emb: torch.Tensor | None, utmos: Utmos | None) -> dict:
    """One clip's figures: its transcript and error rates against text, SIM to the reference, UTMOS."""
    transcript = asr(audio, rate)
    out = {"transcript": transcript, **error_rates(text, transcript, norm)}
    if sv is not None and ref_emb is not None:
        out["sim"] = similarity(sv(audio, rate), ref_emb)
    if utmos is not None:
        out["utmos"] = utmos(audio, rate)
    return out


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def summarise(results: list[dict]) -> dict:
    summary = {"rows": len(results), **{k: mean(results, k) for k in FIGURES}}
    for part in ("ceiling", "model_asr"):
        parts = [r[part] for r in results if part in r]
        if parts:
            summary[part] = {"rows": len(parts), **{k: mean(parts, k) for k in FIGURES if any(k in p for p in parts)}}
    return summary


def print_table(summary: dict, rows_per_minute: float) -> None:
    def cell(x: float | None, pct: bool) -> str:
        return "-" if x is None else f"{x * 100:.2f}%" if pct else f"{x:.3f}"
    ceiling = summary.get("ceiling", {})
    print(f"{'figure':<8} {'model':>10} {'ceiling':>10}   ({summary['rows']} rows, {rows_per_minute:.1f} rows/min; "
          "ceiling: the reference after a codec round trip)")
    for key in FIGURES:
        if summary.get(key) is not None or ceiling.get(key) is not None:
            pct = key in ("wer", "cer")
            print(f"{key.upper():<8} {cell(summary.get(key), pct):>10} {cell(ceiling.get(key), pct):>10}")
    if "model_asr" in summary:
        print(f"the model's own ASR: WER {cell(summary['model_asr']['wer'], True)} over "
              f"{summary['model_asr']['rows']} references", flush=True)


def main() -> None:
    with user_errors():
        cfg = parse_config(EvalConfig, sys.argv[1:], __doc__)
    check_config(cfg)
    print("config:", json.dumps(dataclasses.asdict(cfg)), flush=True)
    rows, bad, fmt = read_list(cfg.list, cfg.audio_root)
    for line in bad:
        print(f"warning: {line}; skipped", file=sys.stderr, flush=True)
    if not rows:
        raise UserError(f"list {cfg.list}: no row to evaluate ({len(bad)} bad rows, said above; read as {fmt})")
    rows = rows[:cfg.max_rows] if cfg.max_rows else rows
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model, tok = load_model(cfg, device, dtype)
    asr, sv, utmos, notes = load_scorers(cfg, device)
    norm = Normaliser(asr.spelling)
    for note in notes:
        print(f"note: {note}", flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    aside = move_aside(cfg.out_dir, ("eval.json", "wav"))
    if aside:
        print(f"note: moved the earlier eval's files in {cfg.out_dir} to {aside}", flush=True)
    os.makedirs(os.path.join(cfg.out_dir, "wav"))
    print(f"{len(rows)} rows ({fmt}) | ASR {cfg.asr} | SV {cfg.sv or 'off'} | normaliser {norm.name} | {device}",
          flush=True)

    sr = tok.sample_rate
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    knobs = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator,
                 decode=cfg.decode)
    results, t_start = [], time.perf_counter()
    for i, row in enumerate(rows):
        try:
            ref = read_audio(row.ref_wav) if row.ref_wav else None
            target = read_audio(row.target_wav) if row.target_wav else None
            ref_tokens = audio_tokens(tok, *ref).to(device) if ref else None
            audio = speak(model, tok, row.text, ref_tokens, row.ref_text, cfg.max_seconds, **knobs)
        except (BadAudio, ValueError) as e:
            bad.append(f"{row.where}: {e}")
            print(f"warning: {row.where}: {e}; skipped", file=sys.stderr, flush=True)
            continue
        wav = os.path.join(cfg.out_dir, "wav", f"{row.id}.wav")
        with WavWriters([wav], [], sr, 0) as out:
            out.write(audio[None])
        ref_emb = sv(*ref) if sv is not None and ref else None
        result = {"id": row.id, "text": row.text, "ref_wav": row.ref_wav, "wav": wav, "seconds": len(audio) / sr,
                  **score(audio, sr, row.text, asr, norm, sv, ref_emb, utmos)}
        if cfg.ceiling and (target or ref):
            # a recording of the target text where the list has one (SIM to the reference), else the reference
            clip, text = (target, row.text) if target else (ref, row.ref_text)
            result["ceiling"] = {"audio": row.target_wav or row.ref_wav,
                                 **score(round_trip(tok, *clip), sr, text, asr, norm, sv, ref_emb, utmos)}
        if cfg.transcribe and ref:
            heard = model_transcript(model, tok, audio_tokens(tok, *ref).to(device), generator=generator)
            result["model_asr"] = {"transcript": heard, **error_rates(row.ref_text, heard, norm)}
        results.append(result)
        print(f"{i + 1}/{len(rows)} {row.id}: WER {result['wer'] * 100:.1f}% | {result['seconds']:.2f} s | "
              f"{result['transcript'][:60]!r}", flush=True)
    if not results:
        raise UserError(f"list {cfg.list}: every row failed (said above)")
    wall = time.perf_counter() - t_start
    summary = summarise(results)
    rows_per_minute = len(results) / wall * 60
    write_json(os.path.join(cfg.out_dir, "eval.json"), {
        "ckpt": cfg.ckpt, "list": cfg.list, "format": fmt, "config": dataclasses.asdict(cfg),
        "models": {"asr": cfg.asr, "asr_beams": cfg.asr_beams, "sv": cfg.sv or None,
                   "utmos": "utmosv2" if utmos else None, "normaliser": norm.name, "codec": tok.name, "device": device},
        "notes": notes, "summary": summary, "rows": results, "bad_rows": bad,
        "wall_s": wall, "rows_per_minute": rows_per_minute})
    print_table(summary, rows_per_minute)
    print(os.path.join(cfg.out_dir, "eval.json"), flush=True)


if __name__ == "__main__":
    run_main(main, on_full_disk="eval.json is written last and whole: free some space and run it again")
