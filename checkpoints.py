"""Model weights on disk: train.py's .pt checkpoints, export.py's folders, Hub ids, and THE one compatibility check.

    ckpt = load_model_source("out/sherlock/best.pt")       # or an export.py folder, or a Hub model id like user/name
    check_compatible(ckpt["meta"], meta, "the model", "data/mine")   # ValueError unless their ids mean the same
    save_checkpoint("out/run/ckpt.pt", {"model": ..., "model_args": ..., "meta": ...})   # atomically

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, loaded with weights_only=True; an
exported folder is safetensors + JSON in transformers' GPT-2 layout (to_gpt2 / from_gpt2 convert, both ways, the
one place that knows it). Neither is ever unpickled. Errors are ValueError naming the file.
"""
from __future__ import annotations

import dataclasses
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


def check_resume(ckpt: dict, path: str, meta: dict, model_args: dict, data_dir: str) -> None:
    """A checkpoint to resume must be train.py's, fit the data (same ids) and the config (same architecture;
    dropout may change). ValueError saying which key differs and how to resume it."""
    missing = [k for k in ("optimizer", "iter_num", "best_val_loss", "meta", "rng", "scaler") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path}: has no {', '.join(missing)}; only train.py's ckpt.pt can be resumed")
    try:
        check_compatible(ckpt["meta"], meta, f"checkpoint {path}", data_dir)
    except ValueError as e:
        raise ValueError(f"{e}; use the dataset it was trained on or a new out_dir") from None
    for key, value in model_args.items():
        if key != "dropout" and ckpt["model_args"].get(key) != value:
            raise ValueError(f"checkpoint {path}: has {key}={ckpt['model_args'].get(key)} but the config says "
                             f"{value}; pass --{key}={ckpt['model_args'].get(key)} to resume it")


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
    from model import GELU_FORMS, GPT, GPTConfig
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
        kind = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(fields[key])]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            expected = {bool: "true or false", str: "a string"}.get(kind, "a number")
            raise ValueError(f"{where}: {key}={value!r}, expected {expected}")
        if kind is int and value < 1:
            raise ValueError(f"{where}: {key}={value}, expected a whole number of at least 1")
    if not 0 <= args["dropout"] < 1:
        raise ValueError(f"{where}: dropout={args['dropout']}, expected a number in [0, 1)")
    if args["gelu"] not in GELU_FORMS:
        raise ValueError(f"{where}: gelu={args['gelu']!r}, expected one of {', '.join(GELU_FORMS)}")
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


def load_checkpoint(path: str, map_location: str = "cpu", keys: tuple[str, ...] = ("model", "model_args")) -> dict:
    """torch.load with weights_only=True; a missing or corrupt file is a ValueError naming it. keys=() loads any
    dict of tensors (a transformers pytorch_model.bin) without checking it as a train.py checkpoint."""
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
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path}: holds a {type(ckpt).__name__}, not a dict of weights")
    if not keys:
        return ckpt
    for key in keys:
        if key not in ckpt:
            raise ValueError(f"checkpoint {path}: has no '{key}' entry; it was not written by gpt2o's train.py")
    if isinstance(ckpt["model_args"], dict):  # a model_args without 'gelu' is a model with the exact GELU
        ckpt["model_args"] = {"gelu": "exact", **ckpt["model_args"]}
    check_weights(ckpt, f"checkpoint {path}")
    return ckpt


# transformers' GPT-2 stores these four matmuls as Conv1D, weight (in, out): the transpose of a Linear's (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_NAMES = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # transformers' name -> gelu
LAYER_NORM_EPS = 1e-5  # model.LayerNorm's, and every GPT-2 size's


def to_gpt2(state: dict[str, torch.Tensor], model_args: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Our weights and GPTConfig -> the weights and config.json of transformers' GPT2LMHeadModel: Conv1D layout,
    the token embedding without its padding rows (lm_head is tied to it, so it is not stored), zero biases where
    bias=False (GPT-2 always has them; adding zeros changes nothing)."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        t = t.t() if name.endswith(CONV1D) else t[:model_args["vocab_size"]] if name == "transformer.wte.weight" else t
        out[name] = t.contiguous()
    if not model_args["bias"]:
        for name in [n for n in out if n.endswith((*CONV1D, "ln_1.weight", "ln_2.weight", "ln_f.weight"))]:
            out[name[:-len("weight")] + "bias"] = out[name].new_zeros(out[name].shape[-1])
    p = model_args["dropout"]
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": model_args["vocab_size"],
              "n_positions": model_args["block_size"], "n_embd": model_args["n_embd"],
              "n_layer": model_args["n_layer"], "n_head": model_args["n_head"], "n_inner": None,
              "activation_function": "gelu" if model_args["gelu"] == "exact" else "gelu_new",
              "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p, "layer_norm_epsilon": LAYER_NORM_EPS,
              "initializer_range": 0.02, "tie_word_embeddings": True,
              "bias": model_args["bias"]}  # gpt2o's own key: false = the biases above are zeros, not weights
    return out, config


def from_gpt2(state: dict[str, torch.Tensor], config: dict, where: str) -> dict:
    """The weights and config.json of a transformers GPT-2 (the Hub's, save_pretrained's, or export.py's) -> a
    checkpoint-like {"model", "model_args"} of our GPT (float32, tied, embedding padded). ValueError naming where
    and what is not a GPT-2 that our model can hold; check_weights then checks every shape."""
    if not isinstance(config, dict) or config.get("model_type") != "gpt2":
        got = config.get("model_type") if isinstance(config, dict) else config
        raise ValueError(f"{where}: model_type {got!r}, expected 'gpt2' (a GPT-2 folder of transformers or export.py)")
    act, eps = config.get("activation_function", "gelu_new"), config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    n_embd = config.get("n_embd", 768)
    for ok, what in ((act in GELU_NAMES, f"activation_function {act!r}, expected one of {', '.join(GELU_NAMES)}"),
                     (isinstance(eps, (int, float)) and abs(eps - LAYER_NORM_EPS) < 1e-12,
                      f"layer_norm_epsilon {eps}, expected {LAYER_NORM_EPS} (GPT-2's, and the only one gpt2o has)"),
                     (config.get("n_inner") in (None, 4 * n_embd), f"n_inner {config.get('n_inner')}, expected "
                      "none (4 x n_embd)"),
                     (config.get("tie_word_embeddings", True) is not False, "tie_word_embeddings false, expected "
                      "true (lm_head is the token embedding)"),
                     (config.get("scale_attn_weights", True) and not config.get("scale_attn_by_inverse_layer_idx")
                      and not config.get("add_cross_attention"), "an attention variant GPT-2 does not have "
                      "(scale_attn_weights, scale_attn_by_inverse_layer_idx, add_cross_attention)")):
        if not ok:
            raise ValueError(f"{where}: {what}")
    bias = config.get("bias", True)
    args = {"block_size": config.get("n_positions", 1024), "vocab_size": config.get("vocab_size", 50257),
            "n_layer": config.get("n_layer", 12), "n_head": config.get("n_head", 12), "n_embd": n_embd,
            "dropout": config.get("resid_pdrop", 0.1), "bias": bias, "gelu": GELU_NAMES[act]}
    # the Hub's own GPT-2 files name the weights without "transformer." and hold the causal mask as a buffer
    state = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in state.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    head, wte = state.pop("lm_head.weight", None), state.get("transformer.wte.weight")
    if isinstance(wte, torch.Tensor) and wte.ndim == 2 and isinstance(args["vocab_size"], int):
        if head is not None and not torch.equal(head, wte):
            raise ValueError(f"{where}: lm_head.weight is not the token embedding; gpt2o's GPT ties the two")
        if wte.shape[0] != args["vocab_size"]:
            raise ValueError(f"{where}: vocab_size={args['vocab_size']}, but the weights hold {wte.shape[0]} token "
                             "embeddings")
        padded = (args["vocab_size"] + 63) // 64 * 64  # GPTConfig.padded_vocab_size; the padding is never sampled
        state["transformer.wte.weight"] = state["lm_head.weight"] = torch.cat(
            [wte, wte.new_zeros(padded - wte.shape[0], wte.shape[1])])
    for name, t in state.items():
        if name.endswith(CONV1D) and t.ndim == 2:
            state[name] = t.t().contiguous()
    if bias is False:
        for name in [n for n in state if n.endswith(".bias")]:
            if state.pop(name).any():
                raise ValueError(f"{where}: bias is false, but the weight {name} is not zero")
    return {"model": state, "model_args": args}


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or else pytorch_model.bin (loaded with weights_only=True), in folder."""
    from safetensors import SafetensorError, safe_open
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        bin_path = os.path.join(folder, "pytorch_model.bin")
        if not os.path.isfile(bin_path):
            raise ValueError(f"model folder {folder}: has no model.safetensors or pytorch_model.bin")
        state = load_checkpoint(bin_path, keys=())
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"model weights {bin_path}: holds more than tensors; expected a state dict")
        return state
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"model weights {path}: cannot be loaded, the file is damaged ({str(e)[:200]})") from None


def load_exported(folder: str) -> dict:
    """A folder written by export.py (transformers' GPT-2 files + meta.json) -> a checkpoint-like dict
    {"model", "model_args", "meta"} of our GPT (lm_head and the token embedding one tensor, as in the model)."""
    missing = [name for name in EXPORTED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        pt = [name for name in ("best.pt", "ckpt.pt") if os.path.isfile(os.path.join(folder, name))]
        hint = f"; it holds {pt[0]}: pass {os.path.join(folder, pt[0])}" if pt else ""
        raise ValueError(f"model folder {folder}: has no {', '.join(missing)}, so it is not a folder written by "
                         f"export.py{hint}")
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path, "model config")
    meta = read_json(os.path.join(folder, "meta.json"), "model meta")
    ckpt = {**from_gpt2(read_weights(folder), config, f"model config {config_path}"), "meta": meta}
    check_weights(ckpt, f"model config {config_path}")
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
