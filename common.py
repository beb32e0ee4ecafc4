"""What the scripts share, small and torch-free at import: one-line errors, atomic writes, torchrun, devices, FLOPs.

    run_main(main)                          # a script's main(): a UserError -> `error: <message>`, exit 1
    with user_errors():                     # a library's ValueError (bad data, bad settings) -> a UserError
        meta, streams = load_dataset(cfg.data_dir)
    write_json(path, obj)                   # atomically: a temp file beside path, fsync, rename
    hold_out_dir_lock(cfg.out_dir)          # one job per out_dir, until main() ends (a second one refuses)

Nothing here runs at import and nothing but die() and a lock's note prints; scripts call these from their main().
The library modules raise ValueError, which scripts turn into UserError (user_errors) with the command that fixes it.
torch is imported inside the functions that use it, so report.py renders a page without loading it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
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


def run_main(main: Callable[[], Any], on_full_disk: str = "") -> None:
    """Run a script's main(): a UserError becomes `error: <message>` on stderr and exit code 1, no traceback.
    Under torchrun every rank meets the same bad input, so only rank 0 prints it (every rank still exits 1).
    SIGTERM (kill, a scheduler's time limit) is a Ctrl-C: temp files are removed on the way out, "interrupted".
    on_full_disk: what a failed write leaves intact, said after the file that could not be written."""
    def terminated(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    # a forked worker (prepare_audio's pool) keeps the default, so Pool.terminate() ends it even when it is stuck
    # in native code, where a Python handler would never run
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        main()
    except UserError as e:
        die(str(e))
    except OSError as e:
        if e.filename is None:  # not about a file the user named: a real bug, keep the traceback
            raise
        if e.errno in FULL_DISK:
            die(f"{e.filename}: {e.strerror}" + (f"; {on_full_disk}" if on_full_disk else ""))
        die(f"{e.filename or '(an empty path)'}: {e.strerror} (check the path, its permissions and the free space)")
    except KeyboardInterrupt:
        die("interrupted")
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().release()


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

FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write that failed for want of space, not for a bug


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def move_aside(out_dir: str, names: tuple[str, ...]) -> str | None:
    """Move the named files of an earlier run into out_dir/old-<time>/ (moved, not deleted: the folder may hold
    more than a run wrote). Returns that folder, None if none of them was there."""
    found = [name for name in names if os.path.lexists(os.path.join(out_dir, name))]
    if not found:
        return None
    aside = base = os.path.join(out_dir, time.strftime("old-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.lexists(aside):
        aside, n = f"{base}-{n}", n + 1
    os.makedirs(aside)
    for name in found:
        os.rename(os.path.join(out_dir, name), os.path.join(aside, name))
    return aside


def write_failed(path: str, e: BaseException, needed: int | None = None) -> OSError:
    """The OSError to raise when writing `path` failed: e's errno and reason, the space the file needed (when
    known) and the space free, with `path` as its filename, so run_main says it in one line. A library error
    without an errno (libsndfile's "System error.") is read as a full disk when less than 1 MB (or `needed`) is
    free, or as the file size limit (ulimit -f) when one is set."""
    import resource
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        free = None
    code = e.errno if isinstance(e, OSError) else None
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code is None:
        if free is not None and free < max(needed or 0, 1 << 20):
            code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
        elif limit != resource.RLIM_INFINITY:
            code, reason = errno.EFBIG, os.strerror(errno.EFBIG)
        else:
            code = errno.EIO
    if code == errno.EFBIG and limit != resource.RLIM_INFINITY:
        reason += f" (the file size limit, ulimit -f, is {format_bytes(limit)})"
    elif code in FULL_DISK:
        sizes = ([f"needs about {format_bytes(needed)}"] if needed else []) + \
            ([f"{format_bytes(free)} free"] if free is not None else [])
        reason += f" ({', '.join(sizes)})" if sizes else ""
    return OSError(code, reason, path)


class _Recording:
    """The temp file as atomic_write's write(f) sees it. Libraries that write through it turn a failed write into
    their own error (torch.save: `RuntimeError: [enforce fail at inline_container.cc]`): this keeps the OSError."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb", size: int | None = None) -> None:
    """Call write(f) on a temp file beside `path`, fsync, then rename it to `path` (a kill never leaves half a file).
    A write that fails (a full disk) is an OSError naming `path` and the `size` it needed when given (write_failed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        f = os.fdopen(fd, mode)
        out = _Recording(f)
        try:
            write(out)
            f.flush()
            os.fsync(f.fileno())
            f.close()
        except BaseException as e:
            try:
                f.close()
            except OSError:
                pass  # the bytes it could not write are lost either way; its error would hide e
            if isinstance(e, OSError) and e.filename is None:  # (one with a filename is about a file write() read)
                raise write_failed(path, e, size) from None
            if isinstance(e, Exception) and not isinstance(e, OSError) and out.error is not None:
                raise write_failed(path, out.error, size) from None
            raise
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
# out_dir: one job at a time (two train.py runs in one out_dir would interleave their logs and checkpoints)

LOCK_NAME = ".gpt2o.lock"
_HELD_LOCKS: list["OutDirLock"] = []  # taken by hold_out_dir_lock, released by run_main when main() ends


def _start_time(pid: int) -> str | None:
    """When a process started (Linux: field 22 of /proc/<pid>/stat): tells a reused pid from a lock's owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    now = _start_time(pid)
    return not (start and now and now != start)  # same pid, later start: the owner died, its pid was reused


class OutDirLock:
    """out_dir/.gpt2o.lock (pid, host, start) while a job writes into out_dir; a second job refuses in one line
    naming the holder. A lock left by a dead process on this host is taken over with a one-line note. The folder is
    made if missing, and removed again on release if it is still empty.

        with OutDirLock("out/run"):        # or hold_out_dir_lock("out/run") in a script's main()
            ...
    """

    def __init__(self, folder: str):
        self.folder, self.path = folder, os.path.join(folder, LOCK_NAME)
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
                       "script": os.path.basename(sys.argv[0]) or "python"}
        self.made_folder = self.held = False

    def _create(self) -> bool:
        """Write the lock whole or not at all: False when one exists (another job's, or a stale one)."""
        self.record["since"] = time.time()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=LOCK_NAME + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            try:
                os.link(tmp, self.path)  # atomic, and fails when the lock exists
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: O_EXCL, then the content
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    json.dump(self.record, f)
            return True
        finally:
            os.remove(tmp)

    def _read(self, path: str) -> dict | None:
        """The lock's record; {} when it is gone, None when it is not one of ours."""
        try:
            with open(path, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
        return holder if ok else None

    def acquire(self) -> None:
        if os.path.lexists(self.folder) and not os.path.isdir(self.folder):
            raise UserError(f"out_dir {self.folder}: exists and is not a folder; pass another out_dir")
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder)
            self.made_folder = True
        for _ in range(10):  # another job may take or drop the lock between our steps: look again
            if self._create():
                self.held = True
                return
            holder = self._read(self.path)
            if holder is None:
                raise UserError(f"out_dir {self.folder}: {self.path} is not a lock written by gpt2o; remove it if "
                                "no job writes into this folder, or use another out_dir")
            if not holder:
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since") or 0)))
            who = (f"{holder.get('script', 'a job')} (process {holder['pid']} on host {holder['host']}, since "
                   f"{since})")
            if holder["host"] != self.record["host"]:
                raise UserError(f"out_dir {self.folder}: in use by {who}; wait for it to end or use another out_dir "
                                f"(if that job is gone, remove {self.path})")
            if _running(holder["pid"], holder.get("start")):
                raise UserError(f"out_dir {self.folder}: in use by {who}; wait for it to end or use another out_dir")
            if self._take_over(holder):
                print(f"note: {self.path}: taken over from {who}, which is no longer running", file=sys.stderr,
                      flush=True)
        raise UserError(f"out_dir {self.folder}: other jobs keep taking {self.path}; use another out_dir")

    def _take_over(self, stale: dict) -> bool:
        """Move the stale lock aside; if it turns out another job took it over first, put theirs back."""
        aside = f"{self.path}.{os.getpid()}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if self._read(aside) == stale:
            os.remove(aside)
            return True
        try:
            os.link(aside, self.path)
        except OSError:
            pass
        os.remove(aside)
        return False

    def release(self) -> None:
        if self.held and self._read(self.path) == self.record:
            os.remove(self.path)
        self.held = False
        if self.made_folder:
            try:
                os.rmdir(self.folder)  # only if still empty: a job that failed up front leaves nothing behind
            except OSError:
                pass

    def __enter__(self) -> "OutDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_out_dir_lock(folder: str) -> None:
    """OutDirLock(folder) for the rest of the script: run_main releases it when main() ends, however it ends."""
    lock = OutDirLock(folder)
    lock.acquire()
    _HELD_LOCKS.append(lock)


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

    def init(self, device: str, group: bool = False) -> str:
        """Join the process group (nccl on CUDA, gloo on CPU); on CUDA each process takes its local rank's GPU.
        group: a one-rank group for a plain process too (FSDP and its sharded checkpoints need one).
        Returns the device this process uses."""
        if not self.ddp and not group:
            return device
        import torch
        if device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        one = {} if self.ddp else dict(store=torch.distributed.HashStore(), rank=0, world_size=1)  # no rendezvous
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", **one)
        return device

    def barrier(self) -> None:
        if self.ddp:
            import torch
            cuda = torch.distributed.get_backend() == "nccl"
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if cuda else None)

    def close(self) -> None:
        import torch
        if torch.distributed.is_initialized():
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
