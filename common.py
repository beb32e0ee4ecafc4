"""What the scripts share, small and torch-free at import: one-line errors, atomic writes, torchrun, devices, FLOPs.

    run_main(main)                          # a script's main(): a UserError -> `error: <message>`, exit 1
    with user_errors():                     # a library's ValueError (bad data, bad settings) -> a UserError
        meta, streams = load_dataset(cfg.data_dir)
    write_json(path, obj)                   # atomically: a temp file beside path, fsync, rename

Nothing here runs at import and nothing but die() prints; scripts call these from their main(). The library modules
raise ValueError, which scripts turn into UserError (user_errors) with the command that fixes it. torch is imported
inside the functions that use it, so report.py renders a page without loading it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
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
    """A JSON file; a missing or unreadable one is a ValueError naming it as `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: not readable JSON ({e})") from None


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
        import torch
        if device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return device

    def barrier(self) -> None:
        if self.ddp:
            import torch
            cuda = torch.distributed.get_backend() == "nccl"
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if cuda else None)

    def close(self) -> None:
        import torch
        if self.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# devices and precision

def pick_device(device: str) -> str:
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not available is a UserError."""
    import torch
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
            import torch
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
    import torch
    return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# speed: the peak FLOP/s that model FLOPs utilisation (MFU) is measured against

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets. First match wins, so longer names come
# first. In float32 (TF32) the peak is taken as half of these (true for A100/H100).
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
    ("4090", 165e12), ("4080", 97e12), ("3090", 71e12), ("3080", 59e12),
]


def measure_matmul_flops(device: str, dtype: torch.dtype | None = None, n: int = 1024, repeat: int = 3) -> float:
    """Achieved FLOP/s of an n x n matmul on `device` (float32 by default): the practical peak on CPUs and unknown
    GPUs."""
    import torch
    dtype = dtype or torch.float32
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
    import torch
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
