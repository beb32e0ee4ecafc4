"""What the scripts share: one-line errors, config parsing, atomic writes, processes, devices, checkpoints and
exported models.

Nothing here runs at import and nothing prints; scripts call these from their main(). The library modules
(model.py, tokenizer.py, sampling.py) do not import this file: they raise ValueError, which scripts turn into
UserError with the command that fixes it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import operator
import os
import pickle
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import torch


class UserError(Exception):
    """Bad input from the user (a file, a key, a value). Scripts print it as one line and exit 1."""


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(): a UserError becomes `error: <message>` on stderr and exit code 1, no traceback.
    Under torchrun every rank meets the same bad input, so only rank 0 prints it (every rank still exits 1)."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except OSError as e:
        if e.filename is None:  # not about a file the user named: a real bug, keep the traceback
            raise
        die(f"{e.filename or '(an empty path)'}: {e.strerror} (check the path, its permissions and the free space)")
    except KeyboardInterrupt:
        die("interrupted")


def die(msg: str) -> NoReturn:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


@contextmanager
def user_errors(hint: str = ""):
    """Turn a library's ValueError (bad data or settings, not a bug) into a UserError, with `hint` appended."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{e}{hint}") from None


# -----------------------------------------------------------------------------
# config: dataclass defaults <- config file (data, never executed) <- --key=value

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}
# bounds on what a config value may evaluate to, checked before each operation: `9**9**9` or `"a" * 10**11` would
# otherwise hang or fill memory before any check on the result could run
MAX_NUMBER = 10 ** 18
MAX_LENGTH = 10_000


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    if isinstance(op, ast.Pow) and _number(a) and _number(b) and abs(b) > 64:
        raise ValueError(f"the exponent {b} is too large (at most 64)")
    if isinstance(op, ast.Mult) and isinstance(a, (str, list)) + isinstance(b, (str, list)) == 1:
        seq, n = (a, b) if isinstance(a, (str, list)) else (b, a)
        if not isinstance(n, int) or len(seq) * max(n, 0) > MAX_LENGTH:
            raise ValueError(f"a text or list longer than {MAX_LENGTH} items")
    value = _BINOPS[type(op)](a, b)
    if _number(value) and not abs(value) <= MAX_NUMBER:  # also catches inf and nan
        raise ValueError(f"{value:.3g} is out of range (at most {MAX_NUMBER:.0e} in size)")
    if isinstance(value, (str, list)) and len(value) > MAX_LENGTH:
        raise ValueError(f"a text or list longer than {MAX_LENGTH} items")
    return value


def _eval_node(node: ast.AST, names: dict[str, Any], where: str) -> Any:
    """Evaluate a literal, a list/tuple of literals, bounded arithmetic, or a name assigned earlier in the file."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval_node(e, names, where) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, names, where)
        if not _number(v):
            raise UserError(f"{where}: a sign only goes before a number, got `{ast.unparse(node)}`")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval_node(node.left, names, where), _eval_node(node.right, names, where)
        try:
            return _binop(node.op, a, b)
        except (ArithmeticError, TypeError, ValueError) as e:  # 1/0, "abc" - 1, 10.0 ** 400, ...
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise UserError(f"{where}: `{ast.unparse(node)}` cannot be evaluated: {reason}") from None
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    raise UserError(f"{where}: only literals, arithmetic and earlier names are allowed, got `{ast.unparse(node)}`")


def read_config_file(path: str) -> dict[str, Any]:
    """Read `key = value` lines from a .py config file as data (parsed with ast, not exec'd)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except OSError as e:
        raise UserError(f"config file {path}: cannot be read ({e.strerror})") from None
    except SyntaxError as e:
        raise UserError(f"config file {path}, line {e.lineno}: not valid Python syntax ({e.msg})") from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"config file {path}: not a text file of `key = value` lines; only a config file may come "
                        "first, every other option is --key=value (e.g. --ckpt=<file>)") from None
    values: dict[str, Any] = {}
    for stmt in tree.body:
        where = f"config file {path}, line {stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise UserError(f"{where}: expected `key = value`, got `{ast.unparse(stmt)[:60]}`")
        key = stmt.targets[0].id
        values[key] = _eval_node(stmt.value, values, f"{where}, key {key}")
    return values


def _convert(key: str, value: Any, typ: type, where: str) -> Any:
    """Convert a config value (a string from the command line, or a literal from a file) to the field's type."""
    if isinstance(value, str) and typ is not str:
        s = value.strip().lower()
        if typ is bool:
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
        else:
            try:
                number = float(s)
                # ints may be written as 1e4, but 2.5 is not an int
                value = number if typ is float else int(number) if number.is_integer() else value
            except ValueError:
                pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # max_iters = 5e3
    if typ is str and isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)  # the shell does not expand ~ after --key=
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"{where}: {key}={value!r} is not a valid {typ.__name__}")
    if typ is float and not math.isfinite(value):
        raise UserError(f"{where}: {key}={value!r} must be a finite number")
    return value


def parse_config(cls: type, argv: list[str], doc: str = "") -> Any:
    """Build a `cls` dataclass from its defaults, an optional config file (first argument), then --key=value.

    `--help` prints `doc` and every key with its type and default, then exits.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = {name: type(f.default) for name, f in fields.items()}
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n\noptions (--key=value, default shown):")
        # the comment beside each field in the dataclass source is its help text
        comments = dict(re.findall(r"^\s*(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.MULTILINE))
        for name, f in fields.items():
            print(f"  --{name}={f.default!r}".ljust(36) + f" {comments.get(name, types[name].__name__)}")
        raise SystemExit(0)
    values: dict[str, Any] = {}
    args = list(argv)
    if args and not args[0].startswith("--") and not ("=" in args[0] and not os.path.exists(args[0])):
        path = args.pop(0)
        for key, value in read_config_file(path).items():
            if key not in fields:
                raise UserError(f"config file {path}: unknown key '{key}' (known keys: {', '.join(fields)})")
            values[key] = _convert(key, value, types[key], f"config file {path}")
    for arg in args:
        if arg.startswith("--") and "=" not in arg and types.get(arg[2:]) is bool:
            arg += "=true"  # a bare --flag turns a boolean on
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument '{arg}': expected --key=value (a config file may only come first)")
        key, value = arg[2:].split("=", 1)
        if key not in fields:
            raise UserError(f"argument '{arg}': unknown key '{key}' (run with --help to list the keys)")
        values[key] = _convert(key, value, types[key], "command line")
    return cls(**values)


# -----------------------------------------------------------------------------
# files: written to a temp name in the same folder, then renamed into place

def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(f) on a temp file beside `path`, fsync, then rename it to `path` (a kill never leaves half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)  # reading the umask means setting it; put it straight back
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temp_files(folder: str, names: tuple[str, ...]) -> list[str]:
    """Delete the temp files atomic_write leaves behind when killed mid-write (`<name>.<random>.tmp`, as big as
    the file itself) for the given file names in folder; returns the names removed. Call it before writing."""
    pattern = re.compile("|".join(rf"{re.escape(n)}\.\w+\.tmp" for n in names))
    removed = sorted(f for f in os.listdir(folder) if pattern.fullmatch(f)) if os.path.isdir(folder) else []
    for name in removed:
        os.remove(os.path.join(folder, name))
    return removed


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def read_json(path: str, what: str = "file") -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: not readable JSON ({e})") from None


# -----------------------------------------------------------------------------
# processes: one, or many under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE)

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def init(self, device: str) -> str:
        """Join the process group (nccl on CUDA, gloo on CPU); on CUDA each process takes its local rank's GPU.
        Returns the device this process uses."""
        if not self.ddp:
            return device
        if device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return device

    def barrier(self) -> None:
        if self.ddp:
            cuda = torch.distributed.get_backend() == "nccl"
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if cuda else None)

    def close(self) -> None:
        if self.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# devices and precision

def pick_device(device: str) -> str:
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not available is a UserError."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device}: CUDA is not available on this machine (use --device=cpu or auto)")
    if kind == "cuda" and ":" in device and not (device.split(":")[1].isdigit()
                                                 and int(device.split(":")[1]) < torch.cuda.device_count()):
        raise UserError(f"device={device}: this machine has GPUs cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device={device}: Apple MPS is not available on this machine (use --device=cpu or auto)")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={device}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA cards that support it, float16 on older ones (a T4), float32 elsewhere."""
    if dtype == "auto":
        if device.startswith("cuda"):
            # bf16 runs natively from compute capability 8 (Ampere) on; torch.cuda.is_bf16_supported() also says
            # yes to the slow emulation on a T4 or V100, which want float16 + loss scaling instead
            return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={dtype}: expected auto, float32, bfloat16 or float16")
    if dtype != "float32" and not device.startswith("cuda"):
        raise UserError(f"dtype={dtype}: mixed precision is only used on CUDA here; use --dtype=float32 on {device}")
    return dtype


def autocast(device: str, dtype: str):
    """The autocast context for the forward pass (a no-op in float32)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# checkpoints: plain dicts of tensors, numbers, strings, lists and dicts; exported models: safetensors + JSON.
# Neither is ever unpickled.

EXPORTED_FILES = ("model.safetensors", "config.json", "meta.json")  # what export.py writes and load_exported reads


def save_checkpoint(path: str, ckpt: dict) -> None:
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str, map_location: str = "cpu") -> dict:
    """torch.load with weights_only=True; a missing or corrupt file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: not found (train one with train.py, or pass --ckpt=<path to ckpt.pt>)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused object: garbage bytes
            raise UserError(f"checkpoint {path}: cannot be loaded: the file is damaged, truncated or not a PyTorch "
                            "checkpoint; use another checkpoint, e.g. best.pt") from None
        # torch's own message suggests weights_only=False: never do that with a file you did not write yourself
        raise UserError(f"checkpoint {path}: holds Python objects that a safe load refuses, so it was not written "
                        "by gpt2o's train.py (gpt2o only loads checkpoints with weights_only=True)") from None
    except Exception as e:  # torch raises many types for a damaged file; its messages are long and unhelpful here
        raise UserError(f"checkpoint {path}: cannot be loaded ({type(e).__name__}): the file is damaged, truncated "
                        "or not a PyTorch checkpoint; use another checkpoint, e.g. best.pt") from None
    for key in ("model", "model_args"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise UserError(f"checkpoint {path}: has no '{key}' entry; it was not written by gpt2o's train.py")
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
        raise UserError(f"model folder {folder}: has no {', '.join(missing)}, so it is not a folder written by "
                        f"export.py{hint}")
    model_args = read_json(os.path.join(folder, "config.json"), "model config")
    meta = read_json(os.path.join(folder, "meta.json"), "model meta")
    path = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"model weights {path}: cannot be loaded, the file is damaged ({str(e)[:200]})") from None
    for name, same in tied.items():
        state[name] = state[same]
    return {"model": state, "model_args": model_args, "meta": meta}


def load_model_source(source: str) -> dict:
    """The weights to sample from or fine-tune, as a checkpoint-like dict {"model", "model_args", "meta", ...}:
    a train.py checkpoint (a .pt file), a folder written by export.py, or a Hugging Face Hub model id (downloaded
    once into the Hub cache; with HF_HUB_OFFLINE=1 only the cache is used)."""
    if source.endswith(".pt") or os.path.isfile(source):
        return load_checkpoint(source)
    if os.path.isdir(source):
        return load_exported(source)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"model {source}: not found; pass a train.py checkpoint (.pt), a folder written by "
                        "export.py, or a Hub model id like user/name")
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo_id=source, allow_patterns=list(EXPORTED_FILES))
    except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise UserError(f"model {source}: not a file or folder here, and it cannot be downloaded from the Hugging "
                        f"Face Hub ({type(e).__name__}: {first}); check the id and your connection, or pass a "
                        "local .pt checkpoint or exported folder") from None
    return load_exported(folder)


# -----------------------------------------------------------------------------
# speed: the peak FLOP/s that model FLOPs utilisation (MFU) is measured against

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets. First match wins, so longer names come
# first. In float32 (TF32) the peak is taken as half of these (true for A100/H100).
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
    ("4090", 165e12), ("4080", 97e12), ("3090", 71e12), ("3080", 59e12),
]


def measure_matmul_flops(device: str, dtype: torch.dtype = torch.float32, n: int = 1024, repeat: int = 3) -> float:
    """Achieved FLOP/s of an n x n matmul on `device`: the practical peak on CPUs and unknown GPUs."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else torch.mps.synchronize if device == "mps" else None
    best = float("inf")
    for _ in range(repeat + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        a @ b
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device: str, dtype: str, override: float = 0.0) -> float:
    """The data-sheet peak of a known GPU, else a measured float32/dtype matmul; `override` wins when > 0."""
    if override > 0:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops if dtype != "float32" else flops / 2
    return measure_matmul_flops(device, getattr(torch, dtype))


def format_duration(seconds: float) -> str:
    """A duration for people: 45s, 12m30s, 3h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
