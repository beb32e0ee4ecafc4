"""Bigger models on more GPUs: FSDP2 wrapping, the memory plan, and sharded checkpoints (torch.distributed.checkpoint).

    shard_model(model, torch.bfloat16, compile_blocks=True)  # one FSDP unit per Block, then the root
    whole = gathered_model(model, "cuda")                  # every rank: a plain copy on rank 0 (eval samples)
    plan = memory_plan(model.config, batch_size=8, world_size=4, fsdp=True, activation_checkpointing=False,
                       dtype="bfloat16")                              # bytes per process, before anything is built
    save_sharded("out/xl/ckpt", model, optimizer, state)   # every rank: the folder is complete or absent
    state = load_sharded("out/xl/ckpt", model, optimizer)  # every rank, on any number of ranks (resharding)
    ckpt = load_consolidated("out/xl/ckpt")                # one process, no group: the dict of train.py's ckpt.pt

A sharded checkpoint is a folder: DCP's shards (__<rank>_0.distcp) and .metadata, which hold tensors only (the
weights and AdamW's moments), and state.pt with the rest of what ckpt.pt holds (config, meta, RNG, iteration,
AdamW's settings), loaded with weights_only=True. DCP writes .metadata with pickle; it is read here with an
unpickler that accepts DCP's own metadata classes and nothing else. The folder is written as <name>.tmp and renamed
into place once state.pt, the last file, is in: a run killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import functools
import os
import pickle
import shutil
import warnings

import torch

from checkpoints import check_weights, save_checkpoint
from common import format_bytes
from model import GPT, Block, GPTConfig

STATE = "state.pt"  # written last: a folder with it is complete
USABLE = 0.9  # of a device's memory: the rest is for the CUDA context, NCCL buffers and the allocator's slack


# -----------------------------------------------------------------------------
# FSDP2: each Block is one unit (its weights gathered just before it runs, freed after), the root holds the rest

def shard_model(model: GPT, param_dtype: torch.dtype | None, compile_blocks: bool = False) -> None:
    """fully_shard each Block, then the root, in place: the weights are kept in float32 and sharded across the
    ranks; param_dtype (bfloat16, or None for float32) is what each unit computes in; gradients are reduced in
    float32. compile_blocks: torch.compile each Block (a whole-model graph would run through FSDP's hooks)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the root returns the logits as a view; nothing changes them in place once returned, which FSDP warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def gathered_model(model: GPT, device: str) -> GPT | None:
    """Every rank calls it (the shards are gathered): on rank 0 a plain GPT on device with the whole weights, to
    sample from; None elsewhere."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.random.fork_rng(devices=[]):  # building it draws init weights: not from training's RNG
        whole = GPT(model.config)
    whole.load_state_dict(weights)
    return whole.to(device)


# -----------------------------------------------------------------------------
# the memory plan: what one process holds at its peak, from the config alone (nothing is allocated)

def memory_plan(config: GPTConfig, batch_size: int, world_size: int, fsdp: bool, activation_checkpointing: bool,
                dtype: str) -> dict[str, float]:
    """Bytes per process at the peak of a training step: parameters, gradients, AdamW's state, activations.
    Weights, gradients and the two moments are float32 (16 bytes a parameter), divided among the ranks with FSDP,
    which also holds two units' weights gathered in the compute dtype and one unit's float32 gradients before
    they are reduce-scattered; without FSDP, bf16 autocast keeps a bf16 copy of each weight for backward and DDP
    a second copy of the gradients in its buckets. Activations, per token and
    layer, are what autograd saves in a Block: 38 x n_embd bytes with bfloat16 autocast and flash attention
    (the float32 residual at both LayerNorms, the bfloat16 inputs of the four matmuls, q/k/v and the attention
    output, the MLP's 4 x n_embd pre- and post-GELU), 68 x n_embd in float32; with activation checkpointing a
    Block keeps its float32 input only and one Block at a time is recomputed. The head adds the logits, their
    float32 softmax and its gradient: 12 bytes (16 in float32) per token and padded vocabulary entry."""
    n, unit = _param_counts(config.block_size, config.padded_vocab_size, config.n_layer, config.n_embd, config.bias)
    half = dtype in ("bfloat16", "float16")
    share = world_size if fsdp else 1
    # FSDP: two units gathered in the compute dtype; autocast without FSDP: a bf16 copy of every weight for backward
    params = 4 * n / share + (2 * unit * (2 if half else 4) if fsdp else 2 * n if half else 0)
    grads = 4 * n / share + (4 * unit if fsdp else 4 * n if world_size > 1 else 0)
    tokens, c = batch_size * config.block_size, config.n_embd
    layer = (38 if half else 68) * c * tokens
    body = config.n_layer * 4 * c * tokens + layer if activation_checkpointing else config.n_layer * layer
    head = (12 if half else 16) * config.padded_vocab_size * tokens + 8 * c * tokens  # + embeddings and ln_f
    plan = {"parameters": params, "gradients": grads, "optimizer": 8 * n / share, "activations": body + head}
    plan["total"] = sum(plan.values())
    return plan


@functools.lru_cache
def _param_counts(block_size: int, vocab: int, n_layer: int, n_embd: int, bias: bool) -> tuple[int, int]:
    """Parameters of the model (the tied embedding once) and of one Block, as GPT builds them."""
    with torch.device("meta"):  # shapes only
        block = Block(GPTConfig(n_embd=n_embd, n_head=1, bias=bias))
    unit = sum(p.numel() for p in block.parameters())
    return n_layer * unit + (vocab + block_size) * n_embd + n_embd * (1 + bias), unit


def device_memory(device: str, local_world_size: int) -> int:
    """The memory one process may use: its GPU's, or on a CPU the machine's RAM shared by this host's ranks."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    if device == "mps":
        return int(torch.mps.recommended_max_memory())
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_world_size)


def format_plan(plan: dict[str, float], budget: int, device: str) -> str:
    parts = " + ".join(f"{k} {format_bytes(v)}" for k, v in plan.items() if k != "total")
    return (f"memory plan per process: {parts} = {format_bytes(plan['total'])} of {format_bytes(budget)} on "
            f"{device} ({plan['total'] / budget:.0%})")


def check_fits(config: GPTConfig, batch_size: int, accumulation: int, world_size: int, fsdp: bool,
               activation_checkpointing: bool, dtype: str, budget: int, device: str) -> dict[str, float]:
    """The plan, or a ValueError when it needs more than USABLE of the budget, naming the options that fit."""
    def total(**change) -> float:
        args = dict(batch_size=batch_size, world_size=world_size, fsdp=fsdp,
                    activation_checkpointing=activation_checkpointing) | change
        return memory_plan(config, dtype=dtype, **args)["total"]

    plan = memory_plan(config, batch_size, world_size, fsdp, activation_checkpointing, dtype)
    limit = USABLE * budget
    if plan["total"] <= limit:
        return plan
    ways = []
    if world_size > 1 and not fsdp and total(fsdp=True) <= limit:
        ways.append("--fsdp=True")
    if not activation_checkpointing and total(activation_checkpointing=True) <= limit:
        ways.append("--activation_checkpointing=True")
    for b in range(batch_size - 1, 0, -1):  # the same tokens per iteration: more micro-steps of fewer sequences
        if batch_size * accumulation % b == 0 and total(batch_size=b) <= limit:
            ways.append(f"--batch_size={b} --gradient_accumulation_steps={batch_size * accumulation // b}")
            break
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if n > world_size and total(world_size=n, fsdp=True, activation_checkpointing=True) <= limit:
            ways.append(f"--fsdp=True --activation_checkpointing=True on {n} processes (torchrun)")
            break
    fit = f"what would fit: {'; or '.join(ways)}" if ways else \
        "nothing here would fit it: use a smaller model (n_layer, n_embd) or block_size"
    raise ValueError(f"{format_plan(plan, budget, device)}, more than the {USABLE:.0%} that training may use; "
                     f"{fit}")


# -----------------------------------------------------------------------------
# sharded checkpoints

def _optimizer_tensors(model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state keyed by parameter name, flattened: {"<name>.exp_avg": tensor, ...}; {} before the first step
    (get_optimizer_state_dict would create it with a zero step, which counts in Adam's bias correction)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    if not optimizer.state:
        return {}
    osd = get_optimizer_state_dict(model, optimizer)
    return {f"{name}.{k}": v for name, state in osd["state"].items() for k, v in state.items()}


def _param_groups(model: GPT, optimizer: torch.optim.Optimizer) -> list[dict]:
    """AdamW's settings, its parameters by name (a tied weight by its first name, as DCP's state dicts do)."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def save_sharded(folder: str, model: GPT, optimizer: torch.optim.Optimizer, state: dict,
                 copies: tuple[str, ...] = ()) -> None:
    """Every rank calls it. Each rank writes its shards into <folder>.tmp, rank 0 adds state.pt (the rest of the
    checkpoint) and renames the folder into place; `copies` (best) get the same files as hard links."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    tmp = folder + ".tmp"
    if dist.get_rank() == 0 and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # left by a save that was killed: never complete
    dist.barrier()
    dcp.save({"model": get_model_state_dict(model), "optimizer": _optimizer_tensors(model, optimizer)},
             storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    if dist.get_rank() == 0:
        save_checkpoint(os.path.join(tmp, STATE), {**state, "param_groups": _param_groups(model, optimizer)})
        _commit(tmp, folder)
        for other in copies:
            if os.path.isdir(other + ".tmp"):
                shutil.rmtree(other + ".tmp")
            shutil.copytree(folder, other + ".tmp", copy_function=_link)
            _commit(other + ".tmp", other)
    dist.barrier()


def _link(src: str, dst: str) -> None:
    """A checkpoint's files are never changed in place (a new one is a new folder), so a hard link is a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: str, folder: str) -> None:
    """Rename the complete tmp folder to folder; the one it replaces goes to <folder>.old until then."""
    _fsync_dir(tmp)
    old = folder + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))
    if os.path.isdir(old):
        shutil.rmtree(old)


def recover(folder: str) -> list[str]:
    """Before a run looks at folder: finish or undo a save that was killed (only a folder with state.pt is
    complete). Returns notes on what was done, for the log."""
    notes, tmp, old = [], folder + ".tmp", folder + ".old"
    if not os.path.isdir(folder):
        for candidate in (tmp, old):  # a kill between _commit's two renames: the newest complete one
            if os.path.isfile(os.path.join(candidate, STATE)):
                os.rename(candidate, folder)
                notes.append(f"restored {folder} from {os.path.basename(candidate)}, left by a save that was killed")
                break
    for leftover in (tmp, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
            notes.append(f"removed {leftover}, left by a save that was killed")
    return notes


def is_sharded(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, STATE))


def read_state(folder: str) -> dict:
    """state.pt: everything of the checkpoint but the tensors in the shards."""
    try:
        return torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, truncated: torch raises many types
        raise ValueError(f"checkpoint {folder}: {STATE} cannot be loaded ({type(e).__name__}); the folder is "
                         "damaged") from None


def load_sharded(folder: str, model: GPT, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank calls it: the weights and AdamW's state into the sharded model and optimizer, resharded to
    this run's ranks; returns state.pt's dict (iteration, RNG, config, meta)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = read_state(folder)
    reader = _reader(folder)
    stepped = any(key.startswith("optimizer.") for key in reader.read_metadata().state_dict_metadata)
    # AdamW's zero state to load into (it is replaced whole, step count included); none if saved before a step
    osd = get_optimizer_state_dict(model, optimizer) if stepped else {"state": {}}
    tensors = {"model": get_model_state_dict(model),
               "optimizer": {f"{n}.{k}": v for n, s in osd["state"].items() for k, v in s.items()}}
    dcp.load(tensors, storage_reader=reader)
    set_model_state_dict(model, tensors["model"])
    if stepped:
        flat = tensors["optimizer"]
        set_optimizer_state_dict(model, optimizer, {
            "state": {n: {k: flat[f"{n}.{k}"] for k in s} for n, s in osd["state"].items()},
            "param_groups": state["param_groups"]})
    return state


def load_consolidated(folder: str) -> dict:
    """A sharded checkpoint as one process's dict in ckpt.pt's form ({"model", "optimizer", "iter_num", ...}),
    without a process group: what export.py, generate.py and a run without --fsdp read."""
    import torch.distributed.checkpoint as dcp
    state = read_state(folder)
    reader = _reader(folder)
    metadata = reader.read_metadata()
    flat = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.state_dict_metadata.items()}
    with warnings.catch_warnings():  # DCP notes that it loads in one process, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=reader, no_dist=True)
    model = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    model["transformer.wte.weight"] = model["lm_head.weight"]  # tied, as in the model's own state_dict
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        if key.startswith("optimizer."):
            name, field = key.removeprefix("optimizer.").rsplit(".", 1)
            opt_state.setdefault(index[name], {})[field] = value
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    ckpt = {k: v for k, v in state.items() if k != "param_groups"}
    ckpt.update(model=model, optimizer={"state": opt_state, "param_groups": groups})
    check_weights(ckpt, f"checkpoint {folder}")
    return ckpt


# DCP's .metadata, read with an allow-list: DCP's metadata classes, torch.Size, dtypes, paths; nothing else
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dcp_class = module == "torch.distributed.checkpoint.metadata" and name != "BytesStorageMetadata"
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED or dcp_class or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensors-only DCP checkpoint")


def _reader(folder: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = os.path.join(folder, ".metadata")
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, OSError) as e:
                raise ValueError(f"checkpoint {folder}: .metadata cannot be read safely ({e}); it was not written "
                                 "by gpt2o's train.py") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)
