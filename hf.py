"""GPT-2 <-> transformers: start from GPT-2's weights, write a folder transformers loads, and keep its sampling to
decodable audio. The weights are read with safetensors and huggingface_hub only; transformers is never imported.

    ckpt = load_model("gpt2")       # gpt2-medium/-large/-xl, a Hub id, a transformers folder, or gpt2o's own weights
    args, state = fit_to_layout(ckpt, meta, eot=50256, block_size=1024, seed=1337)   # GPT-2 + audio/special rows
    tensors, config, generation = export_files(ckpt["model"], ckpt["model_args"], meta)   # what export.py writes
    model.generate(ids, logits_processor=LogitsProcessorList([FrameValidLogits(meta)]))   # in transformers

GPT-2's text ids are kept as they are: the text+audio layout puts the tiktoken encoding's ids first (tokenizer.py),
so a dataset prepared with --text_encoding=gpt2 speaks GPT-2's BPE. Errors are ValueError naming the source.
"""
from __future__ import annotations

import os

import torch

from checkpoints import added_rows, check_weights, from_gpt2, grow_rows, load_model_source, read_weights, to_gpt2
from common import read_json
from model import GPTConfig
from tokenizer import Layout, load_text_encoding

GPT2_SIZES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# the spread of the noise on new embedding rows, in units of the text rows' per-dimension spread (see fit_to_layout)
NEW_ROW_NOISE = 0.01


def load_model(source: str) -> dict:
    """Weights to fine-tune, as a checkpoint-like dict {"model", "model_args", "meta", ...}: gpt2o's own (a .pt,
    an export.py folder or its Hub id: a folder with meta.json) with their "meta", or a transformers GPT-2 (a size
    name, a Hub id, a folder with config.json + model.safetensors or pytorch_model.bin) with "meta" None,
    "eos_token_id" and "base_model" (the Hub id, or the folder's name)."""
    source = GPT2_SIZES.get(source, source)
    if source.endswith(".pt") or os.path.isfile(source):
        return load_model_source(source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "meta.json")) or not os.path.isfile(os.path.join(source, "config.json")):
            return load_model_source(source)  # gpt2o's own folder, or no model folder at all (its message says so)
        return load_gpt2_folder(source, os.path.basename(os.path.normpath(source)))
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or not all(source.split("/")):
        raise ValueError(f"model {source}: not found; pass gpt2 (or gpt2-medium, -large, -xl), a Hub model id like "
                         "user/name, a train.py checkpoint (.pt), or a folder (export.py's, or transformers' "
                         "config.json + model.safetensors)")
    folder = download(source, ["config.json", "meta.json"])
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return load_model_source(source)
    folder = download(source, ["config.json", "model.safetensors"])
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        folder = download(source, ["config.json", "pytorch_model.bin"])
    return load_gpt2_folder(folder, source)


def download(repo_id: str, files: list[str]) -> str:
    """The snapshot folder of those files of a Hub model repo (the cache only with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id=repo_id, allow_patterns=files)
    except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ValueError(f"model {repo_id}: not a file or folder here, and it cannot be downloaded from the Hugging "
                         f"Face Hub ({type(e).__name__}: {first}); check the id and your connection, or pass a local "
                         "folder with its config.json and model.safetensors (`hf download "
                         f"{repo_id} config.json model.safetensors --local-dir <folder>` where there is a "
                         "connection)") from None


def load_gpt2_folder(folder: str, name: str) -> dict:
    """A transformers GPT-2 folder -> {"model", "model_args", "meta": None, "eos_token_id", "base_model": name}."""
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path, "model config")
    where = f"model config {config_path}"
    ckpt = from_gpt2(read_weights(folder), config, where)
    check_weights(ckpt, where)
    return {**ckpt, "meta": None, "eos_token_id": config.get("eos_token_id"), "base_model": name}


def fit_to_layout(ckpt: dict, meta: dict, eot: int, block_size: int, seed: int) -> tuple[dict, dict]:
    """A GPT-2 from load_model and a dataset's meta (eot: its text encoding's end-of-text id) -> (model_args,
    state) of a GPT for the dataset's layout: text rows of the token embedding kept at their ids, rows added for
    the audio codes and special tokens, positions cut to block_size. ValueError unless the dataset's text ids are
    the checkpoint's (the same vocabulary size and end-of-text id) and block_size fits its positions."""
    args, name, layout = ckpt["model_args"], ckpt["base_model"], Layout.from_meta(meta)
    if not layout.text_vocab:
        raise ValueError(f"{name} is a text model, but the data has the audio-only layout (no text ids); prepare "
                         "it with --text_encoding=gpt2 (transcripts, or --text_corpus)")
    if (args["vocab_size"], ckpt["eos_token_id"]) != (layout.text_vocab, eot):
        raise ValueError(f"{name} has {args['vocab_size']} text ids and end-of-text id {ckpt['eos_token_id']}, but "
                         f"the data's text encoding {layout.text_encoding} has {layout.text_vocab} ids and "
                         f"end-of-text id {eot}: not GPT-2's BPE; prepare the data with --text_encoding=gpt2")
    if block_size > args["block_size"]:
        raise ValueError(f"block_size={block_size}: longer than the {args['block_size']} positions {name} has "
                         f"embeddings for; pass --block_size={args['block_size']} or less")
    new_args = {**args, "vocab_size": layout.vocab_size, "block_size": block_size}
    state = dict(ckpt["model"])
    text = state["transformer.wte.weight"][:layout.text_vocab]
    n_new = GPTConfig(**new_args).padded_vocab_size - layout.text_vocab
    # the new rows (audio codes, special tokens, padding) start at the mean of the text rows, as transformers'
    # resize_token_embeddings does: a new token's logit is then about the average text logit, so none of the 12k
    # audio ids starts out dominating or vanishing and the text distribution stays as it was; a little noise (a
    # hundredth of the rows' spread) gives each row its own gradient
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_new, text.shape[1], generator=g) * text.std(dim=0) * NEW_ROW_NOISE
    wte = torch.cat([text, text.mean(dim=0) + noise])
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size].clone()
    return new_args, state


def pretrained(source: str, meta: dict, block_size: int, seed: int, data: str) -> tuple[dict, dict, int]:
    """Weights to fine-tune (a GPT-2 as load_model reads it, or a gpt2o checkpoint, export or Hub id) for a dataset
    (meta, named `data` in errors) -> (the architecture keys of model_args they fix, the state for the dataset's
    layout, how many token rows were added). A GPT-2 keeps block_size and gets rows for the audio and special ids
    (fit_to_layout); a gpt2o model brings its block_size and gets rows only for the specials a chat layout adds."""
    try:
        ckpt = load_model(source)
    except ValueError as e:
        raise ValueError(f"{e} (or scratch, or resume)") from None
    if "base_model" in ckpt:  # a transformers GPT-2: its text ids must be the dataset's
        layout = Layout.from_meta(meta)
        eot = meta.get("text_eot")  # prepare_audio.py records it; else the encoding itself says
        if eot is None and layout.text_vocab:
            eot = load_text_encoding(layout.text_encoding).eot_token
        args, state = fit_to_layout(ckpt, meta, eot, block_size, seed)
        return {k: args[k] for k in ("n_layer", "n_head", "n_embd", "bias", "gelu")}, state, 0
    try:
        grown = added_rows(ckpt.get("meta") or {}, meta, "the model", data)
    except ValueError as e:
        raise ValueError(f"{e}; prepare the data with the model's codec") from None
    args = ckpt["model_args"]
    state = grow_rows(ckpt["model"], int(args["vocab_size"]), int(meta["vocab_size"])) if grown else ckpt["model"]
    return {k: args[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "bias", "gelu")}, state, grown


def export_files(state: dict[str, torch.Tensor], model_args: dict, meta: dict) -> tuple[dict, dict, dict]:
    """Our weights, GPTConfig and token layout -> (model.safetensors' tensors, config.json, generation_config.json)
    of a GPT2LMHeadModel that gives our logits: BOUNDARY opens a document, AUDIO_END / TEXT_END end a segment."""
    tensors, config = to_gpt2(state, model_args)
    layout = Layout.from_meta(meta)
    ends = [layout.special_tokens[k] for k in ("audio_end", "text_end") if k in layout.special_tokens]
    config.update(bos_token_id=layout.boundary_id, eos_token_id=ends[0] if ends else None)
    # pad is an end token: generate() reads a pad id in a prompt as padding unless it is also an eos id, and
    # BOUNDARY opens every prompt
    generation = {"bos_token_id": layout.boundary_id, "eos_token_id": ends or None,
                  "pad_token_id": ends[0] if ends else None, "do_sample": True, "top_k": 0,
                  "max_length": model_args["block_size"]}
    return tensors, config, generation


class FrameValidLogits:
    """A transformers logits processor (call it as one: processor(input_ids, scores) -> scores) that keeps
    `model.generate` to ids the token layout can decode: in audio, each frame position's own level; in text, the
    encoding's ids; a segment's end token only where it may come (sampling.Grammar's rule, the one gpt2o's own
    sampler follows). The prompt must end inside an open segment: Layout.audio_context(), speech_context(text)
    or transcript_context(audio). meta: the export's meta.json."""

    def __init__(self, meta: dict):
        from sampling import Grammar
        self.layout = Layout.from_meta(meta)
        self.grammar = Grammar(self.layout, self.layout.vocab_size, "cpu")
        self.state: torch.Tensor | None = None
        self.length = -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids (B, T), scores (B, vocab_size) -> scores with every id the layout forbids next at -inf."""
        g = self.grammar
        if self.state is not None and input_ids.shape == (len(self.state), self.length + 1):
            self.state = g.advance(self.state, input_ids[:, -1].cpu())  # one new token a row since the last call
        else:  # a new prompt: each row's state from its own context
            self.state = torch.cat([g.start(row, 1) for row in input_ids.cpu()])
        self.length = input_ids.shape[1]
        if g.masks.device != scores.device:
            g.masks = g.masks.to(scores.device)
        return g.mask(scores, self.state.to(scores.device))
