"""GPT-2 <-> transformers (hf.py): a tiny random GPT2LMHeadModel whose vocabulary is the test encoding's stands in
for GPT-2 and its BPE. train.py --init_from gives transformers' logits before any step, trains, resumes exactly
and exports; the export loads in transformers with our logits and greedy tokens; FrameValidLogits keeps generate
frame-valid; the model card's metadata; text encodings: auto, and uint32 shards past 65,535 ids."""
import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import TEXT_ENCODING, assert_one_line_error, run_script
from test_export import hub_cache
from test_train import read_log

from checkpoints import load_checkpoint, load_model_source
from fixtures import random_dataset, tiny_gpt
from hf import FrameValidLogits, export_files, fit_to_layout, load_model
from model import GPT
from sampling import generate_tokens
from tokenizer import Layout, load_text_encoding

transformers = pytest.importorskip("transformers")

ENC = load_text_encoding(TEXT_ENCODING)
LAYOUT = Layout((4, 2, 1), 4096, TEXT_ENCODING, ENC.n_vocab)
TINY = ["--device=cpu", "--compile=False", "--batch_size=2", "--block_size=32", "--dropout=0.0",
        "--learning_rate=3e-3", "--warmup_iters=2", "--peak_flops=1e11", "--eval_iters=2", "--eval_samples=0",
        "--log_interval=1"]


def gpt2_model(seed: int = 0):
    """GPT-2's architecture (biases, tanh GELU, tied embedding), tiny, random, with the test encoding's ids."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=ENC.n_vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=ENC.eot_token, eos_token_id=ENC.eot_token,
                                     initializer_range=0.2)  # activations of a trained model's size, not 0.02's
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's biases are not zero: a wrong bias mapping must show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """{"model", "safetensors": folder, "bin": folder, "cache": a Hub cache holding it as openai-community/gpt2}."""
    root = tmp_path_factory.mktemp("gpt2")
    model = gpt2_model()
    model.save_pretrained(root / "st")
    # a pickled state dict, as the Hub's own GPT-2 ships it: names without "transformer.", the causal mask buffers
    model.save_pretrained(root / "bin")
    os.remove(root / "bin" / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)})
    torch.save(state, root / "bin" / "pytorch_model.bin")
    hub_cache(str(root / "st"), str(root / "hub"), "openai-community/gpt2")
    return {"model": model, "safetensors": str(root / "st"), "bin": str(root / "bin"), "cache": str(root / "hub")}


def run(script: str, *args: str, cache: str = "") -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **({"HF_HUB_CACHE": cache} if cache else {})}
    return run_script(script, *args, env=env)


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, ids)[0]


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_gpt2_folder_reads_as_our_gpt_with_its_logits(gpt2, kind):
    ckpt = load_model(gpt2[kind])
    assert ckpt["meta"] is None and ckpt["eos_token_id"] == ENC.eot_token and ckpt["base_model"] == kind.replace(
        "safetensors", "st")
    assert ckpt["model_args"] == {"block_size": 64, "vocab_size": ENC.n_vocab, "n_layer": 2, "n_head": 2,
                                  "n_embd": 32, "dropout": 0.1, "bias": True, "gelu": "tanh"}
    ours = GPT.from_checkpoint(ckpt).eval()
    ids = torch.randint(0, ENC.n_vocab, (2, 40))
    diff = (hf_logits(gpt2["model"], ids) - our_logits(ours, ids)[..., :ENC.n_vocab]).abs().max()
    assert diff <= 1e-5, diff
    # control: the other GELU form is a real difference, which the gelu field keeps
    for block in ours.transformer.h:
        block.mlp.gelu.approximate = "none"
    assert (hf_logits(gpt2["model"], ids) - our_logits(ours, ids)[..., :ENC.n_vocab]).abs().max() > 1e-5


def test_fit_to_layout_keeps_text_rows_and_checks_the_pairing(gpt2):
    ckpt = load_model(gpt2["safetensors"])
    meta = LAYOUT.meta()
    args, state = fit_to_layout(ckpt, meta, ENC.eot_token, block_size=32, seed=1)
    assert args["vocab_size"] == LAYOUT.vocab_size and args["block_size"] == 32
    wte, text = state["transformer.wte.weight"], ckpt["model"]["transformer.wte.weight"][:ENC.n_vocab]
    assert state["lm_head.weight"] is wte and torch.equal(wte[:ENC.n_vocab], text)
    new = wte[ENC.n_vocab:]
    assert (new - text.mean(0)).abs().max() < 0.1 * text.std(0).max() and new.std(0).min() > 0  # mean + noise
    model = GPT.from_checkpoint({"model": state, "model_args": args})  # loads: every shape fits
    assert model.config.block_size == 32
    with pytest.raises(ValueError, match="end-of-text id 456, but the data's text encoding .* has 457 ids and "
                                         "end-of-text id 3"):
        fit_to_layout(ckpt, meta, 3, 32, 1)
    other = Layout((4, 2, 1), 4096, "gpt2", 50257).meta()
    with pytest.raises(ValueError, match="457 text ids .* text encoding gpt2 has 50257 ids"):
        fit_to_layout(ckpt, other, 50256, 32, 1)
    with pytest.raises(ValueError, match="block_size=128: longer than the 64 positions"):
        fit_to_layout(ckpt, meta, ENC.eot_token, 128, 1)
    with pytest.raises(ValueError, match="audio-only layout"):
        fit_to_layout(ckpt, Layout((4, 2, 1), 4096).meta(), None, 32, 1)


def test_not_a_gpt2_folder_is_one_line(gpt2, tmp_path):
    import shutil
    folder = tmp_path / "llama"
    shutil.copytree(gpt2["safetensors"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama', expected 'gpt2'"):
        load_model(str(folder))
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the weights have no transformer.h.1.mlp.c_fc.weight"):
        load_model(str(folder))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("data"))
    meta = random_dataset(folder, LAYOUT, [3000], [400])
    with open(f"{folder}/meta.json", "w") as f:  # a Hub dataset, so the model card names it
        json.dump({**meta, "dataset": "alice/speech", "dataset_hub": True}, f)
    return folder


@pytest.fixture(scope="module")
def tuned(gpt2, data, tmp_path_factory):
    """train.py --init_from=gpt2 (the stand-in, from a Hub cache, offline): 0 steps, then 4, then the export."""
    root = tmp_path_factory.mktemp("tuned")
    start = run("train.py", *TINY, f"--data_dir={data}", f"--out_dir={root}/start", "--init_from=gpt2",
                "--max_iters=0", cache=gpt2["cache"])
    assert start.returncode == 0, start.stderr
    full = run("train.py", *TINY, f"--data_dir={data}", f"--out_dir={root}/full", "--init_from=gpt2",
               "--max_iters=4", "--eval_interval=2", cache=gpt2["cache"])
    assert full.returncode == 0, full.stderr
    r = run("export.py", f"--ckpt={root}/full/ckpt.pt", f"--out={root}/exported", "--repo_id=alice/tiny-tts")
    assert r.returncode == 0, r.stderr
    return {"root": root, "start": f"{root}/start", "full": f"{root}/full", "exported": f"{root}/exported"}


def test_init_from_gpt2_starts_from_its_text_logits(gpt2, tuned):
    ckpt = load_checkpoint(f"{tuned['start']}/ckpt.pt")
    assert ckpt["iter_num"] == 0 and ckpt["model_args"]["gelu"] == "tanh" and ckpt["model_args"]["bias"]
    ours = GPT.from_checkpoint(ckpt).eval()
    ids = torch.randint(0, ENC.n_vocab, (2, 32))  # text ids, at the same positions
    diff = (hf_logits(gpt2["model"], ids) - our_logits(ours, ids)[..., :ENC.n_vocab]).abs().max()
    assert diff <= 1e-5, diff
    losses = [r["loss"] for r in read_log(tuned["full"]) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]  # and it trains


def test_export_loads_in_transformers_with_our_logits_and_greedy_tokens(tuned):
    ckpt = load_checkpoint(f"{tuned['full']}/ckpt.pt")
    ours = GPT.from_checkpoint(ckpt).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tuned["exported"]).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel" and theirs.config.vocab_size == LAYOUT.vocab_size
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 32))
    diff = (hf_logits(theirs, ids) - our_logits(ours, ids)[..., :LAYOUT.vocab_size]).abs().max()
    assert diff <= 1e-5, diff
    meta = json.load(open(f"{tuned['exported']}/meta.json"))
    context = torch.as_tensor(LAYOUT.audio_context())[None]
    n_frames = 3
    greedy = theirs.generate(context, do_sample=False, max_new_tokens=n_frames * LAYOUT.frame_size,
                             logits_processor=transformers.LogitsProcessorList([FrameValidLogits(meta)]))
    expected = generate_tokens(ours, LAYOUT, None, n_frames, temperature=0.0)
    assert torch.equal(greedy[0, context.shape[1]:], expected[0])
    # our loader reads the same file back: the same greedy tokens
    again = GPT.from_checkpoint(load_model_source(tuned["exported"])).eval()
    assert torch.equal(generate_tokens(again, LAYOUT, None, n_frames, temperature=0.0), expected)


def test_frame_valid_logits_keep_generate_decodable(tmp_path):
    import safetensors.torch
    meta = LAYOUT.meta()
    model = tiny_gpt(LAYOUT.vocab_size, block_size=96, n_embd=32)
    tensors, config, generation = export_files(model.state_dict(), dataclasses.asdict(model.config), meta)
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.manual_seed(0)
    processors = transformers.LogitsProcessorList([FrameValidLogits(meta)])
    end = LAYOUT.special("audio_end")

    def decodable(row: torch.Tensor) -> bool:
        """Whole frames, each id at its position's level, up to the row's AUDIO_END (which ends it at a frame)."""
        row = row[:int((row == end).nonzero()[0])] if (row == end).any() else row
        try:
            LAYOUT.tokens_to_codes(row)
            return True
        except ValueError:
            return False

    unconditional = torch.as_tensor(LAYOUT.audio_context())[None].repeat(3, 1)
    out = theirs.generate(unconditional, do_sample=True, top_k=0, max_new_tokens=5 * LAYOUT.frame_size,
                          logits_processor=processors, eos_token_id=end, pad_token_id=end)
    assert all(decodable(row) for row in out[:, unconditional.shape[1]:])
    speech = torch.as_tensor(LAYOUT.speech_context(ENC.encode_ordinary("You see.")))[None]  # text-to-speech
    out = theirs.generate(speech, do_sample=True, top_k=0, max_new_tokens=8 * LAYOUT.frame_size,
                          logits_processor=processors, eos_token_id=end, pad_token_id=end)
    assert decodable(out[0, speech.shape[1]:])
    # control: the same model without the processor writes ids no codec can decode
    out = theirs.generate(unconditional, do_sample=True, top_k=0, max_new_tokens=5 * LAYOUT.frame_size,
                          eos_token_id=end, pad_token_id=end)
    assert not any(decodable(row) for row in out[:, unconditional.shape[1]:])


def test_model_card_metadata_and_no_absolute_path(tuned):
    from huggingface_hub import ModelCard
    card = ModelCard.load(f"{tuned['exported']}/README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.base_model, data.datasets, data.license) == \
        ("transformers", "text-to-speech", "openai-community/gpt2", ["alice/speech"], "mit")
    assert "--text=" in card.text and "--transcribe=" in card.text and "FrameValidLogits(meta)" in card.text
    assert "fine-tuned from `openai-community/gpt2`" in card.text
    # the card's transformers snippet runs as written, on the folder itself
    code = card.text.split("```python\n")[1].split("```")[0]
    code = code.replace('snapshot_download("alice/tiny-tts")', repr(tuned["exported"]))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["audio_ids"]) and len(scope["audio_ids"]) % LAYOUT.frame_size == 0
    for root, _, files in os.walk(tuned["exported"]):
        for name in files:
            if name.endswith((".json", ".md")):
                text = open(os.path.join(root, name), encoding="utf-8").read()
                assert str(tuned["root"]) not in text and "/tmp" not in text, name
    meta = json.load(open(f"{tuned['exported']}/meta.json"))
    assert meta["training"]["config"]["out_dir"] == "full"  # the run's folder, by its name only


@pytest.mark.slow
def test_a_gpt2_fine_tune_resumes_exactly(gpt2, data, tuned, tmp_path):
    args = [*TINY, f"--data_dir={data}", "--eval_interval=2", "--lr_decay_iters=4", "--n_layer=2", "--n_head=2",
            "--n_embd=32", "--bias=True", "--gelu=tanh"]  # resume checks the architecture against these
    half = run("train.py", *args, f"--out_dir={tmp_path}/half", "--init_from=gpt2", "--max_iters=2",
               cache=gpt2["cache"])
    assert half.returncode == 0, half.stderr
    rest = run("train.py", *args, f"--out_dir={tmp_path}/half", "--init_from=resume", "--max_iters=4")
    assert rest.returncode == 0, rest.stderr

    def strip(rows: list[dict]) -> list[dict]:  # timings differ between runs
        return [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "mfu")} for r in rows]

    assert strip(read_log(f"{tmp_path}/half")) == strip(read_log(tuned["full"]))
    a, b = (load_checkpoint(f"{d}/ckpt.pt")["model"] for d in (tuned["full"], f"{tmp_path}/half"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hub_gpt2_offline_is_one_line(tmp_path):
    data = str(tmp_path / "data")
    random_dataset(data, LAYOUT, [3000], [400])
    r = run("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/c", "--init_from=gpt2-medium")
    assert_one_line_error(r, "init_from=gpt2-medium", "openai-community/gpt2-medium", "cannot be downloaded",
                          "hf download")


def test_uint32_shards_read_as_ids(tmp_path):
    big = Layout((4, 2, 1), 4096, "gpt2o_test_big", load_text_encoding("gpt2o_test_big").n_vocab)
    from dataset import get_batch, load_dataset
    random_dataset(str(tmp_path), big, [5000], [500], dtype="uint32")
    meta, streams = load_dataset(str(tmp_path))
    assert meta["dtype"] == "uint32" and os.path.getsize(tmp_path / "train_000.bin") == 4 * 5000
    x, _ = get_batch(streams["train"], np.arange(0, 4000, 1000), 64, "cpu", big.vocab_size)
    assert x.max() >= 1 << 16
    with open(tmp_path / "meta.json") as f:
        meta = json.load(f)
    with open(tmp_path / "meta.json", "w") as f:  # the ids do not fit the dtype it names: refused
        json.dump({**meta, "dtype": "uint16"}, f)
    with pytest.raises(ValueError, match="expected 82294 / uint32"):
        load_dataset(str(tmp_path))


def test_auto_text_encoding_plain_audio_prepares_offline(tmp_path, codec_dir):
    import soundfile as sf
    from conftest import synth_audio
    (tmp_path / "audio").mkdir()
    for i in range(2):
        sf.write(tmp_path / "audio" / f"{i}.wav", synth_audio(0.3, 24000, seed=i), 24000)
    env = {"HF_HUB_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": str(tmp_path / "no_bpe_here")}  # GPT-2's BPE: unreachable
    r = run_script("prepare_audio.py", f"--dataset={tmp_path / 'audio'}", f"--codec={codec_dir}",
                   f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--val_files=0", env=env)
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["layout"] == "snac-depth-first-v1" and meta["vocab_size"] == 3 * 4096 + 1
    assert "text_encoding=auto: none" in r.stdout
    (tmp_path / "audio" / "0.txt").write_text("A transcript.")  # now it has text: GPT-2's BPE, which is offline
    r = run_script("prepare_audio.py", f"--dataset={tmp_path / 'audio'}", f"--codec={codec_dir}",
                   f"--out_dir={tmp_path / 'out2'}", "--device=cpu", "--val_files=0", env=env)
    assert_one_line_error(r, "text encoding 'gpt2'", "--text_encoding=none")


@pytest.mark.slow
def test_a_big_encoding_writes_uint32_shards_that_train_and_speak(tmp_path, codec_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shutil
    enc = load_text_encoding("gpt2o_test_big")
    audio_only = Layout((4, 2, 1), 4096)
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 4096, 7 * 40) + np.tile(audio_only.frame_levels * 4096, 40), text)
            for text in ["Holmes came.", "The data.", "You see.", "It is clear."] * 4]
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"snac24khz": [a.tolist() for a, _ in rows], "text": [t for _, t in rows]}),
                   tmp_path / "src" / "part-0.parquet")
    codec = tmp_path / "codec"  # pre-tokenised codes: the codec's config.json is all prepare reads
    codec.mkdir()
    shutil.copy(os.path.join(codec_dir, "config.json"), codec / "config.json")
    r = run_script("prepare_audio.py", f"--dataset={tmp_path / 'src'}", f"--codec={codec}", "--device=cpu",
                   f"--out_dir={tmp_path / 'data'}", "--text_encoding=gpt2o_test_big", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "data" / "meta.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == enc.n_vocab + 3 * 4096 + 5
    ids = np.fromfile(tmp_path / "data" / "train_000.bin", dtype="<u4")
    assert ids.max() >= 1 << 16 and len(ids) == sum(s["tokens"] for s in meta["shards"] if s["split"] == "train")
    r = run("train.py", *TINY, f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--block_size=64", "--max_iters=2", "--eval_interval=2")
    assert r.returncode == 0, r.stderr
    r = run("generate.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--text=You see.", "--seconds=0.3",
            f"--codec={codec_dir}", f"--out_dir={tmp_path / 'wav'}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "wav")
