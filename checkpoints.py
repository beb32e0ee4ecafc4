"""Model weights on disk: train.py's .pt checkpoints, export.py's folders, Hub ids, and THE one compatibility check.

    ckpt = load_model_source("out/sherlock/best.pt")       # or an export.py folder, or a Hub model id like user/name
    check_compatible(ckpt["meta"], meta, "the model", "data/mine")   # ValueError unless their ids mean the same
    save_checkpoint("out/run/ckpt.pt", {"model": ..., "model_args": ..., "meta": ...})   # atomically

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, loaded with weights_only=True; an
exported folder is safetensors + JSON. Neither is ever unpickled. Errors are ValueError naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import torch

from common import atomic_write, read_json

# what two token streams must share for their ids to mean the same: the codec's codes, then the ids the layout
# gives them (text_encoding and vocab_size cover the text ids)
CODEC_KEYS = ("vq_strides", "codebook_size")
LAYOUT_KEYS = (*CODEC_KEYS, "layout", "text_encoding", "vocab_size")


def check_compatible(model_meta: dict, data_meta: dict, model: str = "the model", data: str = "the data",
                     keys: tuple[str, ...] = LAYOUT_KEYS) -> None:
    """The one check that a model's tokens and others (a dataset, a codec, a checkpoint to resume) are the same
    ids: both are meta dicts (meta.json, a checkpoint's "meta", AudioTokenizer.meta()). Raises ValueError naming
    the first key that differs and both values; callers add what to do about it."""
    for key in keys:
        if model_meta.get(key) != data_meta.get(key):
            raise ValueError(f"{model} has {key} {model_meta.get(key)} but {data} has {key} {data_meta.get(key)}")


def added_rows(model_meta: dict, data_meta: dict, model: str = "the model", data: str = "the data") -> int:
    """check_compatible for fine-tuning: 0 when the ids are the same, or the number of embedding rows the model
    must grow when the data's layout extends the model's (every id of the model keeps its meaning and the data
    adds special tokens after them: the chat layout's role tokens over the text+audio layout). ValueError
    otherwise, from check_compatible."""
    mine, theirs = model_meta.get("special_tokens"), data_meta.get("special_tokens")
    n_model, n_data = model_meta.get("vocab_size"), data_meta.get("vocab_size")
    extends = isinstance(mine, dict) and isinstance(theirs, dict) and isinstance(n_model, int) and \
        isinstance(n_data, int) and n_data > n_model and all(theirs.get(k) == v for k, v in mine.items()) and \
        all(v >= n_model for k, v in theirs.items() if k not in mine) and model_meta.get("layout") != \
        data_meta.get("layout")
    if not extends:
        check_compatible(model_meta, data_meta, model, data)
        return 0
    check_compatible(model_meta, data_meta, model, data, (*CODEC_KEYS, "text_encoding"))
    return n_data - n_model


def grow_rows(state: dict[str, torch.Tensor], vocab_size: int, new_vocab_size: int) -> dict[str, torch.Tensor]:
    """The weights with token rows vocab_size .. new_vocab_size - 1 added to wte and lm_head (tied: one tensor),
    each the mean of the real rows: a new token starts with an average logit, neither dominating nor absent. The
    table keeps the model's padding to its padded_vocab_size (zero rows, never targets nor sampled)."""
    from model import GPTConfig
    wte = state["transformer.wte.weight"]
    real = wte[:vocab_size]
    rows = GPTConfig(vocab_size=new_vocab_size).padded_vocab_size
    grown = torch.cat([real, real.mean(dim=0, keepdim=True).expand(new_vocab_size - vocab_size, -1),
                       real.new_zeros(rows - new_vocab_size, real.shape[1])])
    out = dict(state)
    out["transformer.wte.weight"] = grown
    if "lm_head.weight" in out:  # tied in every GPT of ours; a loaded dict may hold it as a second, equal tensor
        out["lm_head.weight"] = grown
    return out


def tokenizer_meta(ckpt: dict, source: str) -> dict:
    """A checkpoint's record of what its ids mean (its "meta": codec, token layout); ValueError when it has none."""
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or "layout" not in meta:
        raise ValueError(f"checkpoint {source}: has no tokenizer meta ('meta' with the codec and token layout); "
                         "it was not written by gpt2o's train.py from a prepare_audio.py dataset")
    return meta


EXPORTED_FILES = ("model.safetensors", "config.json", "meta.json")  # what export.py writes and load_exported reads


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nested dict/list: about what torch.save writes of it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str, ckpt: dict) -> None:
    """Atomically; on a full disk an OSError naming path and about how much space it needed."""
    atomic_write(path, lambda f: torch.save(ckpt, f), size=tensor_bytes(ckpt))


def check_weights(ckpt: dict, where: str) -> None:
    """The model_args (a GPTConfig) and the weights must describe one model: every key known, values in range,
    every weight of the shape the config gives it. ValueError naming `where` (the file), the key and what is
    expected; GPT.from_checkpoint then cannot fail."""
    from model import GPT, GPTConfig
    args, state = ckpt["model_args"], ckpt["model"]
    fields = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    if not isinstance(args, dict) or not isinstance(state, dict):
        raise ValueError(f"{where}: the model config and the weights must be dicts")
    for key in args:
        if key not in fields:
            raise ValueError(f"{where}: unknown key '{key}' (expected {', '.join(fields)})")
    for key in fields:
        if key not in args:
            raise ValueError(f"{where}: has no '{key}' (expected {', '.join(fields)})")
    for key, value in args.items():
        kind = {"int": int, "float": (int, float), "bool": bool}[str(fields[key])]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"{where}: {key}={value!r}, expected {'true or false' if kind is bool else 'a number'}")
        if kind is int and value < 1:
            raise ValueError(f"{where}: {key}={value}, expected a whole number of at least 1")
    if not 0 <= args["dropout"] < 1:
        raise ValueError(f"{where}: dropout={args['dropout']}, expected a number in [0, 1)")
    if args["n_embd"] % args["n_head"]:
        raise ValueError(f"{where}: n_embd={args['n_embd']} is not divisible by n_head={args['n_head']}")
    config = GPTConfig(**args)
    # what the weights say, key by key, before the shape of every tensor
    found = {"n_layer": len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})}
    if isinstance(state.get("transformer.wpe.weight"), torch.Tensor) and state["transformer.wpe.weight"].ndim == 2:
        found["block_size"], found["n_embd"] = state["transformer.wpe.weight"].shape
    wte = state.get("transformer.wte.weight")
    if isinstance(wte, torch.Tensor) and wte.ndim == 2 and wte.shape[0] != config.padded_vocab_size:
        raise ValueError(f"{where}: vocab_size={args['vocab_size']} needs {config.padded_vocab_size} rows of "
                         f"token embeddings, the weights have {wte.shape[0]}")
    for key, value in found.items():
        if value != args[key]:
            raise ValueError(f"{where}: {key}={args[key]}, but the weights hold {key}={value}")
    meta = ckpt.get("meta")
    if isinstance(meta, dict) and "vocab_size" in meta and meta["vocab_size"] != args["vocab_size"]:
        raise ValueError(f"{where}: vocab_size={args['vocab_size']}, but the token layout (meta) has vocab_size="
                         f"{meta['vocab_size']}")
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    for key in expected.keys() - state.keys():
        raise ValueError(f"{where}: the weights have no {key}, which this config needs (bias={args['bias']}?)")
    for key in state.keys() - expected.keys():
        raise ValueError(f"{where}: the weights have {key}, which this config does not (bias={args['bias']}?)")
    for key, shape in expected.items():
        got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else None
        if got != shape:
            raise ValueError(f"{where}: weight {key} has shape {got}, the config gives it {shape}")


def load_checkpoint(path: str, map_location: str = "cpu") -> dict:
    """torch.load with weights_only=True; a missing or corrupt file is a ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path}: not found (train one with train.py, or pass --ckpt=<path to ckpt.pt>)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused object: garbage bytes
            raise ValueError(f"checkpoint {path}: cannot be loaded: the file is damaged, truncated or not a PyTorch "
                             "checkpoint; use another checkpoint, e.g. best.pt") from None
        # torch's own message suggests weights_only=False: never do that with a file you did not write yourself
        raise ValueError(f"checkpoint {path}: holds Python objects that a safe load refuses, so it was not written "
                         "by gpt2o's train.py (gpt2o only loads checkpoints with weights_only=True)") from None
    except Exception as e:  # torch raises many types for a damaged file; its messages are long and unhelpful here
        raise ValueError(f"checkpoint {path}: cannot be loaded ({type(e).__name__}): the file is damaged, truncated "
                         "or not a PyTorch checkpoint; use another checkpoint, e.g. best.pt") from None
    for key in ("model", "model_args"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ValueError(f"checkpoint {path}: has no '{key}' entry; it was not written by gpt2o's train.py")
    check_weights(ckpt, f"checkpoint {path}")
    return ckpt


def untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (the tied wte/lm_head weight): keep one name per storage, the
    last in state_dict order (lm_head.weight), and return the dropped names as {dropped: kept}."""
    kept: dict[tuple, str] = {}
    for name, t in state.items():
        kept[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = name
    tied = {name: kept[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))]
            for name, t in state.items()}
    tied = {a: b for a, b in tied.items() if a != b}
    return {k: v.contiguous() for k, v in state.items() if k not in tied}, tied


def load_exported(folder: str) -> dict:
    """A folder written by export.py -> a checkpoint-like dict {"model", "model_args", "meta"} (tied weights
    re-tied: both names point at one tensor again, as in the model's own state_dict)."""
    from safetensors import SafetensorError, safe_open
    missing = [name for name in EXPORTED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        pt = [name for name in ("best.pt", "ckpt.pt") if os.path.isfile(os.path.join(folder, name))]
        hint = f"; it holds {pt[0]}: pass {os.path.join(folder, pt[0])}" if pt else ""
        raise ValueError(f"model folder {folder}: has no {', '.join(missing)}, so it is not a folder written by "
                         f"export.py{hint}")
    model_args = read_json(os.path.join(folder, "config.json"), "model config")
    meta = read_json(os.path.join(folder, "meta.json"), "model meta")
    path = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"model weights {path}: cannot be loaded, the file is damaged ({str(e)[:200]})") from None
    if not isinstance(tied, dict) or not all(isinstance(v, str) and v in state for v in tied.values()):
        raise ValueError(f"model weights {path}: its 'tied' metadata names weights it does not hold")
    for name, same in tied.items():
        state[name] = state[same]
    ckpt = {"model": state, "model_args": model_args, "meta": meta}
    check_weights(ckpt, f"model config {os.path.join(folder, 'config.json')}")
    return ckpt


def load_model_source(source: str) -> dict:
    """The weights to sample from or fine-tune, as a checkpoint-like dict {"model", "model_args", "meta", ...}:
    a train.py checkpoint (a .pt file), a folder written by export.py, or a Hugging Face Hub model id (downloaded
    once into the Hub cache; with HF_HUB_OFFLINE=1 only the cache is used)."""
    if source.endswith(".pt") or os.path.isfile(source):
        return load_checkpoint(source)
    if os.path.isdir(source):
        return load_exported(source)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"model {source}: not found; pass a train.py checkpoint (.pt), a folder written by "
                         "export.py, or a Hub model id like user/name")
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo_id=source, allow_patterns=list(EXPORTED_FILES))
    except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ValueError(f"model {source}: not a file or folder here, and it cannot be downloaded from the Hugging "
                         f"Face Hub ({type(e).__name__}: {first}); check the id and your connection, or pass a "
                        "local .pt checkpoint or exported folder") from None
    return load_exported(folder)
