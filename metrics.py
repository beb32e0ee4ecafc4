"""The figures TTS papers report: WER/CER of an ASR transcript, speaker similarity (SIM), predicted MOS (UTMOS).

    asr = Asr("openai/whisper-large-v3", device="cuda")          # or a local folder of a Whisper model
    norm = Normaliser(asr.spelling)                               # Whisper's English normaliser
    rates = error_rates("It's 10 o'clock.", asr(audio, 24000), norm)   # {"wer": ..., "cer": ...}
    sv = SpeakerEmbedder("microsoft/wavlm-base-plus-sv")          # WavLM x-vectors through transformers
    sim = similarity(sv(generated, 24000), sv(reference, 24000))  # cosine, 1 for the same clip

transformers and jiwer are imported when a model or a rate is first asked for, so training imports this file without
them. Models load from a Hub id (downloaded once into the Hugging Face cache) or a local folder; one that cannot be
loaded is a ValueError naming it and what to fetch.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from codec import to_mono

DEFAULT_ASR = "openai/whisper-large-v3"  # Seed-TTS-eval's English ASR
DEFAULT_SV = "microsoft/wavlm-base-plus-sv"  # WavLM fine-tuned for speaker verification, in transformers' format
MODEL_RATE = 16000  # Whisper, WavLM and UTMOS all take 16 kHz audio


# -----------------------------------------------------------------------------
# text: the normaliser and the error rates

class Normaliser:
    """Whisper's English normaliser (transformers' EnglishTextNormalizer: case, punctuation, numbers, contractions,
    British to American spelling). The spelling map ships with a Whisper tokenizer (normalizer.json); without one
    the rest still applies, and `name` says so, since "colour" and "color" then differ."""

    def __init__(self, spelling: dict[str, str] | None = None):
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
        self.fn = EnglishTextNormalizer(spelling or {})
        self.name = "whisper-english" if spelling else "whisper-english (no spelling map)"

    def __call__(self, text: str) -> str:
        return " ".join(self.fn(text).split())


def error_rates(reference: str, hypothesis: str, norm: Normaliser) -> dict[str, float]:
    """Word and character error rates of hypothesis against reference, both normalised first (jiwer).
    A reference that normalises to nothing is a ValueError: no rate is defined for it."""
    import jiwer
    ref, hyp = norm(reference), norm(hypothesis)
    if not ref:
        raise ValueError(f"reference text {reference!r} is empty once normalised: no error rate for it")
    return {"wer": float(jiwer.wer(ref, hyp)), "cer": float(jiwer.cer(ref, hyp))}


# -----------------------------------------------------------------------------
# models: where each comes from, and one line when it cannot be had

def is_local_or_cached(source: str) -> bool:
    """A folder, or a Hub id whose config.json is in the local cache: loading it downloads nothing (or little)."""
    if os.path.isdir(source):
        return True
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # a malformed id: loading it will say so
        return False


def quiet_transformers() -> None:
    """No progress bars or advice from transformers in a script's output: its one-line messages stay ours."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*key_padding_mask.*")


def load_failed(what: str, source: str, flag: str, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    where = "" if os.path.isdir(source) else (f"; offline, fetch it once where there is internet "
                                              f"(`hf download {source}`) or pass {flag}=<a local folder of it>")
    return ValueError(f"{what} {source}: cannot be loaded ({type(e).__name__}: {first}){where}")


class Asr:
    """Speech -> text with transformers' automatic-speech-recognition pipeline (a Whisper model, or any CTC or
    seq2seq ASR model it runs). language is passed to multilingual Whisper models only; beams to seq2seq models
    (1, greedy, as Seed-TTS-eval decodes; the pipeline's own default is 5, as F5-TTS's faster-whisper)."""

    def __init__(self, source: str = DEFAULT_ASR, device: str = "cpu", language: str = "en", beams: int = 1):
        quiet_transformers()
        from transformers import pipeline
        try:
            self.pipe = pipeline("automatic-speech-recognition", model=source, device=torch.device(device))
        except Exception as e:  # offline, unknown repo, not an ASR model: transformers raises many types
            raise load_failed("ASR model", source, "--asr", e) from None
        self.source = source
        self.rate = int(getattr(self.pipe.feature_extractor, "sampling_rate", MODEL_RATE))
        gen = getattr(self.pipe.model, "generation_config", None)
        multilingual = bool(getattr(gen, "lang_to_id", None)) and getattr(gen, "is_multilingual", True)
        self.generate_kwargs = {"language": language, "task": "transcribe"} if multilingual and language else {}
        if getattr(self.pipe.model.config, "is_encoder_decoder", False):
            self.generate_kwargs["num_beams"] = beams
        # Whisper's tokenizer files carry the normaliser's spelling map
        self.spelling = getattr(self.pipe.tokenizer, "english_spelling_normalizer", None) or None

    @torch.no_grad()
    def __call__(self, audio: np.ndarray, sample_rate: int) -> str:
        wav = to_mono(audio, sample_rate, self.rate)
        if not len(wav):  # a model that ended its audio at once said nothing
            return ""
        kwargs = {"generate_kwargs": self.generate_kwargs} if self.generate_kwargs else {}
        return str(self.pipe({"raw": wav, "sampling_rate": self.rate}, **kwargs)["text"]).strip()


class SpeakerEmbedder:
    """Audio -> a unit-length speaker embedding: the x-vector of a WavLM (or wav2vec 2) model for speaker
    verification (transformers' *ForXVector)."""

    def __init__(self, source: str = DEFAULT_SV, device: str = "cpu"):
        quiet_transformers()
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector
        try:
            self.features = AutoFeatureExtractor.from_pretrained(source)
            self.model = AutoModelForAudioXVector.from_pretrained(source).to(device).eval()
        except Exception as e:
            raise load_failed("speaker-verification model", source, "--sv", e) from None
        self.source, self.device = source, device
        self.rate = int(getattr(self.features, "sampling_rate", MODEL_RATE))

    @torch.no_grad()
    def __call__(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        wav = to_mono(audio, sample_rate, self.rate)
        wav = np.pad(wav, (0, max(0, self.rate // 4 - len(wav))))  # the convolutions need a few frames: pad silence
        inputs = self.features(wav, sampling_rate=self.rate, return_tensors="pt").to(self.device)
        emb = self.model(**inputs).embeddings[0].float()  # (xvector_output_dim,)
        return torch.nn.functional.normalize(emb, dim=0).cpu()


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two speaker embeddings, in [-1, 1]."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


class Utmos:
    """UTMOSv2's predicted MOS (1 to 5) where its package (utmosv2) is installed; its weights download once."""

    def __init__(self, device: str = "cpu"):
        try:
            import utmosv2
        except ImportError:
            raise ValueError("UTMOS: the utmosv2 package is not installed (UTMOSv2 from its repository, or "
                             "pip install hyperion-utmosv2); or pass --utmos=False") from None
        try:
            self.model = utmosv2.create_model(pretrained=True, device=device)
        except Exception as e:  # its weights download on first use
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"UTMOS: utmosv2 cannot load its model ({type(e).__name__}: {first}); run it once "
                             "with internet to fetch its weights, or pass --utmos=False") from None

    def __call__(self, audio: np.ndarray, sample_rate: int) -> float:
        mos = self.model.predict(data=to_mono(audio, sample_rate, MODEL_RATE), sr=MODEL_RATE, verbose=False)
        return float(np.asarray(mos).reshape(-1)[0])
