"""The audio samples train.py writes at every eval: a few seconds of the model, decoded with the dataset's codec.

    samples = EvalSamples(out_dir, meta, n=2, seconds=5.0, device="cuda", seed=1337)   # rank 0 only
    row.update(samples(raw_model, iter_num, last=iter_num == max_iters))   # out_dir/samples/iter000500_uncond0.wav
    samples.report()                                       # then out_dir/report.html, in the same time budget
    EvalSamples(..., asr="openai/whisper-large-v3", sv="", rows=read_list(path)[0])   # speak rows, log their WER

With an ASR model (train.py's eval_asr) the samples of a text+audio dataset are rows spoken by the model (the first
eval_samples rows of eval_list, or SENTENCES), and each eval logs their WER and CER (metrics.py), and their SIM to
the row's reference voice when there is an SV model (eval_sv); the ASR's time counts in the samples' budget.

The files are named and found by report.py (sample_path, list_samples), which renders them.
"""
from __future__ import annotations

import io
import math
import os
import sys
import time

import torch

from checkpoints import CODEC_KEYS, check_compatible
from common import atomic_write
from report import refresh, sample_path

SAMPLE_SHARE = 0.1  # eval samples may take at most this share of the run's training time (first and last: always)
MAX_EVAL_SAMPLES = 64  # a glance at the model at every eval; generate.py makes any number
MAX_EVAL_SAMPLE_SECONDS = 300.0  # the tokens of a sample are held whole: bound them
SAMPLE_BATCH = 8  # samples generated and decoded together: memory is that of this many, however many there are


def sample_specs(meta: dict, n: int) -> list[tuple[str, torch.Tensor | None]]:
    """What to sample at each eval: (name, prompt tokens, or None for unconditional). Samples with the same prompt
    are generated together, SAMPLE_BATCH at a time. This is the list to extend."""
    return [(f"uncond{i}", None) for i in range(n)]


class EvalSamples:
    """Rank 0's audio at every eval: a few short samples of the model, decoded with the dataset's codec.

    Sampling draws from its own torch.Generator, and the codec's decoder noise from the seed (tok.noise_seed), so the
    training randomness (dropout masks, exact resume, 1 process = N processes) is untouched. On a fast GPU a few
    seconds of sampling can be a large share of a short eval interval: an eval skips its samples (and the rebuild of
    report.html) when those so far plus these would take more than SAMPLE_SHARE of the run's other time (the first
    and last evals never skip).
    """

    def __init__(self, out_dir: str, meta: dict, n: int, seconds: float, device: str, seed: int, codec: str = "",
                 asr: str = "", sv: str = "", rows: list | None = None):
        self.out_dir, self.meta, self.seconds, self.device, self.seed = out_dir, meta, seconds, device, seed
        self.codec = codec or meta.get("codec") or ""  # a Hub id or local folder; by default the dataset's
        self.specs = sample_specs(meta, n)
        self.asr_source, self.sv_source = asr, sv
        if asr and n:  # with an ASR model the samples are spoken rows, not unconditional audio
            from evalset import SENTENCES
            self.rows = (rows or SENTENCES)[:n]
        else:
            self.rows = []
        self.scorers = None  # (Asr, SpeakerEmbedder or None, Normaliser), loaded at the first eval
        self.tok = None  # the codec, loaded at the first eval
        self.on = bool(self.specs)
        self.t_start, self.spent, self.cost, self.calls = time.perf_counter(), 0.0, 0.0, 0
        self.now = False  # whether this eval writes samples and the report

    def due(self, last: bool) -> bool:
        """Within the budget: the first and the last eval always; others while samples stay under SAMPLE_SHARE."""
        other = time.perf_counter() - self.t_start - self.spent
        return self.calls == 0 or last or self.spent + self.cost <= SAMPLE_SHARE * other

    def __call__(self, model: torch.nn.Module, it: int, last: bool = False) -> dict:
        """Write this eval's samples; returns the log entries ({"sample_s": seconds} when samples were written)."""
        self.now = self.due(last)  # report() follows this eval's decision
        if not self.now:
            return {}
        self.calls += 1
        self.cost = 0.0
        if not self.on:
            return {}
        t0 = time.perf_counter()
        cuda = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        # the codec's initialisation draws from the global RNG: fork it, so training's is untouched (its decoder's
        # noise has its own seed, tok.noise_seed)
        with torch.random.fork_rng(devices=cuda):
            if self.tok is None and not self.load_codec():
                return {}
            if self.rows and self.scorers is None and not self.load_scorers():
                return {}
            from codec import BadAudio
            try:
                paths, figures = self.speak(model, it) if self.rows else (self.write(model, it), {})
            except (ValueError, BadAudio) as e:  # a model that cannot sample, a row's reference that cannot be read
                return self.off(str(e))
        self.cost = time.perf_counter() - t0
        self.spent += self.cost
        said = "".join(f" | {k[5:].upper()} {v * 100:.1f}%" if k != "eval_sim" else f" | SIM {v:.3f}"
                       for k, v in figures.items() if k.startswith("eval_"))
        print(f"iter {it} | samples {len(paths)} x {self.seconds:g} s in {self.cost:.1f} s -> "
              f"{os.path.join(self.out_dir, 'samples')}{said}", flush=True)
        return {"sample_s": self.cost, **figures}

    def report(self) -> None:
        """Rebuild report.html after an eval whose samples were due: its time counts in the same budget (drawing
        the page's plots can cost as much as the samples)."""
        if self.now:
            t0 = time.perf_counter()
            refresh(self.out_dir, self.meta)
            self.cost += time.perf_counter() - t0
            self.spent += time.perf_counter() - t0

    def off(self, why: str) -> dict:
        """Training goes on without samples: one warning line, once."""
        print(f"warning: eval samples are off: {why}; or pass --eval_samples=0", file=sys.stderr, flush=True)
        self.on = False
        return {}

    def load_codec(self) -> bool:
        """The codec, with the dataset's own layout; False (samples off, one warning) when it cannot decode them."""
        from codec import load_codec
        from tokenizer import Layout
        try:  # spoken rows need the text encoding; audio samples do not
            tok = load_codec(self.codec, device=self.device, text_encoding=self.meta["text_encoding"] if self.rows
                             else "")
        except ValueError as e:
            return bool(self.off(str(e)))
        # the samples are audio: the codec must make the dataset's codes (CODEC_KEYS), and their ids are the
        # dataset's own layout (with text, audio ids come after the text ids), so no text encoding is loaded
        try:
            check_compatible(tok.meta(), self.meta, f"codec {self.codec}", "the dataset", keys=CODEC_KEYS)
        except ValueError as e:
            return bool(self.off(f"{e}; pass the dataset's codec with --codec"))
        try:
            tok.layout = Layout.from_meta(self.meta)
        except ValueError as e:
            return bool(self.off(str(e)))
        tok.noise_seed = self.seed  # the same decoder noise at every eval, like the samples' own generator
        self.tok = tok
        return True

    def load_scorers(self) -> bool:
        """The ASR (and SV) models; False (samples off, one warning) when one cannot be loaded."""
        from metrics import Asr, Normaliser, SpeakerEmbedder
        try:
            asr = Asr(self.asr_source, self.device)
            sv = SpeakerEmbedder(self.sv_source, self.device) if self.sv_source else None
        except ValueError as e:
            return bool(self.off(str(e)))
        self.scorers = (asr, sv, Normaliser(asr.spelling))
        return True

    @torch.no_grad()
    def speak(self, model: torch.nn.Module, it: int) -> tuple[list[str], dict[str, float]]:
        """Speak each row, write it as a sample, and score it: ({"eval_wer", "eval_cer"[, "eval_sim"]} means)."""
        from codec import read_audio
        from evalset import audio_tokens, speak
        from metrics import error_rates, similarity
        tok, (asr, sv, norm) = self.tok, self.scorers
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        was_training, paths, scores, scoring = model.training, [], [], 0.0
        model.eval()
        try:
            for i, row in enumerate(self.rows):
                ref = read_audio(row.ref_wav) if row.ref_wav else None
                ref_tokens = audio_tokens(tok, *ref).to(self.device) if ref else None
                audio = speak(model, tok, row.text, ref_tokens, row.ref_text, self.seconds, generator=generator)
                paths.append(self.save(sample_path(self.out_dir, it, f"tts{i}"), audio, tok.sample_rate))
                t0 = time.perf_counter()
                rates = error_rates(row.text, asr(audio, tok.sample_rate), norm)
                if sv is not None and ref is not None:
                    rates["sim"] = similarity(sv(audio, tok.sample_rate), sv(*ref))
                scoring += time.perf_counter() - t0
                scores.append(rates)
        finally:
            model.train(was_training)
        keys = [k for k in ("wer", "cer", "sim") if any(k in r for r in scores)]
        means = {f"eval_{k}": sum(r[k] for r in scores if k in r) / sum(k in r for r in scores) for k in keys}
        return paths, {**means, "asr_s": scoring}  # asr_s: the seconds of sample_s spent scoring

    @staticmethod
    def save(path: str, audio, sample_rate: int) -> str:
        import soundfile as sf
        wav = io.BytesIO()  # encoded first: the write to disk is then plain bytes, with plain errors
        sf.write(wav, audio, sample_rate, format="WAV", subtype="PCM_16")
        atomic_write(path, lambda f: f.write(wav.getbuffer()), size=wav.getbuffer().nbytes)
        return path

    @torch.no_grad()
    def write(self, model: torch.nn.Module, it: int) -> list[str]:
        from sampling import decode_in_chunks, generate_tokens
        tok = self.tok
        n_frames = math.ceil(self.seconds * tok.sample_rate / tok.frame_hop)
        groups: dict[int, tuple[torch.Tensor | None, list[str]]] = {}  # the samples of each distinct prompt
        for name, prompt in self.specs:
            groups.setdefault(id(prompt), (prompt, []))[1].append(name)
        batches = [(prompt, names[i:i + SAMPLE_BATCH]) for prompt, names in groups.values()
                   for i in range(0, len(names), SAMPLE_BATCH)]
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        was_training, paths = model.training, []
        model.eval()  # no dropout while sampling
        try:
            for prompt, names in batches:
                tokens = generate_tokens(model, tok.layout, prompt, n_frames, num_samples=len(names),
                                         generator=generator)  # (B, len(prompt) + n_frames * frame_size)
                start = 0 if prompt is None else len(prompt)
                audio = decode_in_chunks(tok, tokens[:, start:]).cpu().numpy()  # (B, n_frames * frame_hop)
                for name, a in zip(names, audio):
                    paths.append(self.save(sample_path(self.out_dir, it, name), a, tok.sample_rate))
        finally:
            model.train(was_training)
        return paths
