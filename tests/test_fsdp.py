"""--fsdp on CPU over gloo: FSDP = DDP = one process, sharded checkpoints (kill -9 mid-save, resharding, export),
the memory plan and its refusal."""
import dataclasses
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, assert_one_line_error
from test_train import TINY, read_log, run_train, write_dataset

ARGS = TINY + ["--gradient_accumulation_steps=4", "--log_interval=1", "--eval_interval=3", "--dropout=0.1",
               "--lr_decay_iters=12"]  # dropout on: its masks, too, must not depend on how the model is split
# FSDP reduce-scatters each micro-step's gradients and DDP all-reduces their sum: float32 sums in another order,
# about 1e-7 relative per step, a few 1e-7 after 6 steps of AdamW (measured: at most 1.5e-6 on the loss)
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), train_tokens=[20, 500, 7, 300, 1000],
                         val_tokens=[25, 15])


def losses(out_dir: str) -> list[float]:
    return [r.get("loss", r.get("val_loss")) for r in read_log(out_dir)]


def weights(path: str) -> dict:
    from distributed import is_sharded, load_consolidated
    return (load_consolidated(path) if is_sharded(path) else torch.load(path, weights_only=True))["model"]


@pytest.mark.slow
def test_fsdp_ddp_and_one_process_train_the_same_model(data, tmp_path, codec_dir):
    # 3 val windows of 1: rank 0 evaluates two batches, rank 1 one (and FSDP's ranks must run as many forwards)
    args = ARGS + [f"--data_dir={data}", "--max_iters=6", "--batch_size=1", "--gradient_accumulation_steps=8",
                   "--eval_iters=3"]
    samples = ["--eval_samples=1", "--eval_sample_seconds=0.5", f"--codec={codec_dir}"]  # from a gathered copy
    runs = {"one": ([], 0), "ddp": ([], 2), "fsdp": (["--fsdp=True", *samples], 2),
            "fsdp_ac": (["--fsdp=True", "--activation_checkpointing=True"], 2)}
    for name, (extra, n) in runs.items():
        r = run_train(args + extra + [f"--out_dir={tmp_path}/{name}"], torchrun=n)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "memory plan per process: parameters" in r.stdout
    one = losses(f"{tmp_path}/one")
    assert len(one) == 9 and one[-1] < one[0] - 0.3, one  # 6 steps and 3 evals; it learns
    for name in ("ddp", "fsdp", "fsdp_ac"):
        other = losses(f"{tmp_path}/{name}")
        assert max(abs(a - b) for a, b in zip(one, other)) < TOL and len(other) == len(one), (name, one, other)
    assert sorted(os.listdir(f"{tmp_path}/fsdp/samples"))[0] == "iter000000_uncond0.wav"
    a, b = weights(f"{tmp_path}/one/ckpt.pt"), weights(f"{tmp_path}/fsdp/ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def rank_pid(torchrun: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker with that RANK (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == torchrun.pid and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_kill_mid_save_resumes_exactly_reshards_and_exports(data, tmp_path):
    args = ARGS + [f"--data_dir={data}", "--max_iters=12", "--eval_interval=2", "--fsdp=True"]
    full = run_train(args + [f"--out_dir={tmp_path}/full"], torchrun=2)
    assert full.returncode == 0, full.stderr

    # kill -9 rank 1 while a checkpoint is being written (ckpt.tmp/) and an earlier one is complete (ckpt/)
    out = f"{tmp_path}/killed"
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *args, f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    victim, killed, seen = None, False, set()  # seen: the ckpt/ folders committed so far (a new inode each)
    while p.poll() is None and not killed:
        victim = victim or rank_pid(p, 1)
        try:
            seen.add(os.stat(f"{out}/ckpt").st_ino)
        except FileNotFoundError:
            pass
        if victim and len(seen) >= 2 and os.path.isdir(f"{out}/ckpt.tmp"):  # a checkpoint after a step exists
            os.kill(victim, signal.SIGKILL)
            killed = True
        time.sleep(0.0005)
    stderr = p.communicate(timeout=120)[1]
    assert killed and p.returncode != 0, stderr[-2000:]
    assert os.path.isdir(f"{out}/ckpt.tmp")  # the save it was killed in: never committed
    last = torch.load(f"{out}/ckpt/state.pt", weights_only=True)["iter_num"]
    assert 2 <= last < 12

    for fsdp in ("True", "False"):  # copies of the killed run, resumed on 1 process below
        shutil.copytree(out, f"{out}{fsdp}")

    resumed = run_train(args + [f"--out_dir={out}", "--init_from=resume"], torchrun=2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed {out}/ckpt.tmp" in resumed.stdout and not os.path.exists(f"{out}/ckpt.tmp")
    assert losses(out) == losses(f"{tmp_path}/full")  # bit for bit
    a, b = weights(f"{tmp_path}/full/ckpt"), weights(f"{out}/ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the 2-rank checkpoint resumes on 1 process, sharded (a one-rank group) or whole
    for fsdp in ("True", "False"):
        r = run_train(args[:-1] + [f"--fsdp={fsdp}", f"--out_dir={out}{fsdp}", "--init_from=resume"])
        assert r.returncode == 0, r.stderr
        other = losses(f"{out}{fsdp}")
        assert len(other) == len(losses(out)) and max(abs(x - y) for x, y in zip(other, losses(out))) < TOL
    assert os.path.isfile(f"{out}False/ckpt.pt")  # a run without --fsdp writes the single file, which is now the
    assert_one_line_error(run_train(args + [f"--out_dir={out}False", "--init_from=resume"]),  # latest
                          "holds ckpt.pt (iteration 12), written without --fsdp")

    # export.py gathers a sharded folder into the safetensors folder generate.py reads
    from checkpoints import load_exported
    r = subprocess.run([sys.executable, "export.py", f"--ckpt={out}/best", f"--out={tmp_path}/exported"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exported, best = load_exported(f"{tmp_path}/exported"), weights(f"{out}/best")
    rows = exported["model_args"]["vocab_size"]  # the export keeps the real vocabulary, not the padding rows
    assert all(torch.equal(exported["model"][k][:rows], best[k][:rows]) for k in best)
    assert exported["meta"]["training"]["iter_num"] == 12


def test_consolidated_checkpoint_is_ckpt_pt_and_reads_safely(tmp_path):
    """A sharded folder written by a one-rank group in this process: load_consolidated gives the dict of ckpt.pt,
    with AdamW's state in torch's own form; a .metadata that pickles anything but DCP's classes is refused."""
    import torch.distributed as dist
    from distributed import _commit, load_consolidated, recover, save_sharded, shard_model
    from fixtures import tiny_gpt
    model, plain = tiny_gpt(100, block_size=16), tiny_gpt(100, block_size=16)  # the same weights
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_model(model, None)
        optimizers = []
        for m in (model, plain):  # one AdamW step each
            optimizers.append(m.train().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu"))
            x = torch.arange(32).view(2, 16) % 100
            m(x, x)[1].backward()
            optimizers[-1].step()
        state = {"model_args": dataclasses.asdict(model.config), "iter_num": 1, "optimizer": {},
                 "meta": {"layout": "x", "vocab_size": 100}}
        save_sharded(f"{tmp_path}/ckpt", model, optimizers[0], state, copies=(f"{tmp_path}/best",))
    finally:
        dist.destroy_process_group()
    plain_opt = optimizers[1]
    ckpt = load_consolidated(f"{tmp_path}/best")
    assert ckpt["iter_num"] == 1 and ckpt["meta"]["vocab_size"] == 100
    ref = plain.state_dict()
    assert ckpt["model"].keys() == ref.keys() and all(torch.allclose(ckpt["model"][k], ref[k]) for k in ref)
    assert ckpt["model"]["transformer.wte.weight"] is ckpt["model"]["lm_head.weight"]  # tied again
    ref_opt = plain_opt.state_dict()
    assert [g["params"] for g in ckpt["optimizer"]["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    for i, s in ref_opt["state"].items():
        assert torch.allclose(ckpt["optimizer"]["state"][i]["exp_avg"], s["exp_avg"]), i
    plain_opt.load_state_dict(ckpt["optimizer"])  # what a run without --fsdp does on resume

    os.remove(f"{tmp_path}/best/.metadata")  # a hard link to ckpt/'s: a new file, not written through it
    with open(f"{tmp_path}/best/.metadata", "wb") as f:  # a pickle that would run os.system on load
        pickle.dump(type("Evil", (), {"__reduce__": lambda self: (os.system, ("echo owned",))})(), f)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_consolidated(f"{tmp_path}/best")

    # a save killed before it was committed is removed; one killed between the two renames is completed
    os.rename(f"{tmp_path}/ckpt", f"{tmp_path}/x")
    os.makedirs(f"{tmp_path}/ckpt.tmp")
    _commit(f"{tmp_path}/x", f"{tmp_path}/ckpt.old")  # what _commit leaves when killed after its first rename
    assert recover(f"{tmp_path}/ckpt") == [f"restored {tmp_path}/ckpt from ckpt.old, left by a save that was "
                                           f"killed", f"removed {tmp_path}/ckpt.tmp, left by a save that was killed"]
    assert load_consolidated(f"{tmp_path}/ckpt")["iter_num"] == 1 and recover(f"{tmp_path}/ckpt") == []


def test_memory_plan_and_what_would_fit():
    from distributed import check_fits, memory_plan
    from model import GPTConfig
    xl = GPTConfig(block_size=2048, vocab_size=12289, n_layer=48, n_head=25, n_embd=1600)
    n = 48 * 12 * 1600 ** 2 + 12352 * 1600 + 2048 * 1600 + (48 * 2 + 1) * 1600  # weights: 1.50e9
    one = memory_plan(xl, 4, 1, False, False, "bfloat16")
    assert one["parameters"] == 6 * n and one["optimizer"] == 8 * n and one["gradients"] == 4 * n  # + bf16 copy
    ddp = memory_plan(xl, 4, 8, False, False, "bfloat16")
    assert ddp["gradients"] == 8 * n  # DDP's buckets: a second copy
    fsdp = memory_plan(xl, 4, 8, True, False, "bfloat16")
    assert fsdp["optimizer"] == n and 0.5 * n < fsdp["parameters"] < 0.6 * n
    ac = memory_plan(xl, 4, 8, True, True, "bfloat16")
    assert ac["activations"] < fsdp["activations"] / 4
    assert one["total"] == sum(v for k, v in one.items() if k != "total")
    with pytest.raises(ValueError) as e:  # a 24 GB card
        check_fits(xl, 4, 16, 8, False, False, "bfloat16", 24 * 2 ** 30, "cuda:0")
    msg = str(e.value)
    assert msg.startswith("memory plan per process: parameters 9.0 GB") and "of 25.8 GB on cuda:0" in msg
    assert "would fit: --fsdp=True --activation_checkpointing=True on 16 processes" in msg
    h200 = 141 * 10 ** 9  # one H200: XL fits with FSDP's one-rank group and activation checkpointing
    assert check_fits(xl, 4, 16, 1, True, True, "bfloat16", h200, "cuda:0")["total"] < 0.9 * h200
    with pytest.raises(ValueError, match="would fit: --activation_checkpointing=True; or --batch_size=16 "
                                         "--gradient_accumulation_steps=4;"):
        check_fits(xl, 32, 2, 1, True, False, "bfloat16", h200, "cuda:0")


def test_refusals_are_one_line(data, tmp_path):
    from common import UserError
    from config import parse_config
    from train import TrainConfig, check_config
    for args, words in ((["--fsdp=True", "--dtype=float16"], "fsdp=True with dtype=float16: float16 needs loss"),
                        (["--fsdp=True", "--device=mps"], "fsdp=True with device=mps: FSDP runs on CUDA")):
        with pytest.raises(UserError, match=words):
            check_config(parse_config(TrainConfig, args), world_size=1)
    out = f"{tmp_path}/out"
    # 51B parameters: 16 bytes each is more than this machine; refused before anything is built or written
    line = assert_one_line_error(run_train(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--n_layer=64",
                                                   "--n_embd=8192", "--n_head=64"]), "memory plan per process")
    assert "would fit: --fsdp=True --activation_checkpointing=True on" in line and not os.path.exists(out)


def test_gpt2_configs_parse_and_fit_where_they_say():
    from config import parse_config
    from distributed import check_fits
    from model import GPTConfig
    from train import TrainConfig, check_config
    fits = {"gpt2_medium": (8, 40e9), "gpt2_large": (8, 48e9), "gpt2_xl": (8, 24 * 2 ** 30)}  # their docstrings
    for name, (ranks, memory) in fits.items():
        cfg = parse_config(TrainConfig, [os.path.join(ROOT, "configs", f"{name}.py")])
        check_config(cfg, world_size=ranks)
        assert cfg.init_from == name.replace("_", "-") and cfg.block_size == 1024  # GPT-2's positions
        model = GPTConfig(block_size=cfg.block_size, vocab_size=62550, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd)  # the text+audio layout of GPT-2's BPE
        args = (cfg.batch_size, cfg.gradient_accumulation_steps, ranks, cfg.fsdp, cfg.activation_checkpointing,
                "bfloat16")
        check_fits(model, *args, int(memory), "cuda")
        with pytest.raises(ValueError, match="what would fit"):  # the control: half that memory does not
            check_fits(model, *args, int(memory / 2), "cuda")
    check_fits(model, cfg.batch_size, cfg.gradient_accumulation_steps, 1, True, True, "bfloat16", int(141e9), "cuda")
