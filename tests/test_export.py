"""export.py and the one model loader: a pickle-free folder (safetensors, tied weights), the model card, the same
greedy tokens from the folder, a Hub id (through huggingface_hub's cache, offline) and the .pt, a push that fails
offline in one line, and train.py --init_from=<exported folder> fine-tuning from published weights."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, SNAC_24KHZ_CONFIG, assert_one_line_error, run_script, save_random_snac
from test_train import TINY, read_log, run_train, write_dataset

from checkpoints import load_model_source
from model import GPT
from sampling import generate_tokens
from tokenizer import Layout


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_script(script, *args, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, codec_dir):
    """A real train.py run (2 iterations, eval samples on) whose dataset names the offline codec."""
    root = tmp_path_factory.mktemp("run")
    data = write_dataset(str(root / "data"), train_tokens=[700], val_tokens=[120])
    with open(f"{data}/meta.json") as f:
        meta = json.load(f)
    with open(f"{data}/meta.json", "w") as f:
        json.dump({**meta, "codec": codec_dir}, f)
    r = run_train(TINY + [f"--data_dir={data}", f"--out_dir={root}/out", "--max_iters=2", "--eval_interval=2",
                          "--log_interval=1", "--eval_samples=1", "--eval_sample_seconds=0.2"])
    assert r.returncode == 0, r.stderr
    return {"data": data, "out": str(root / "out"), "root": root}


@pytest.fixture(scope="module")
def exported(trained):
    folder = str(trained["root"] / "exported")
    r = run("export.py", f"--ckpt={trained['out']}/best.pt", f"--out={folder}", "--license=apache-2.0",
            "--repo_id=alice/gpt2o-tiny")
    assert r.returncode == 0, r.stderr
    assert f"use it: python generate.py --ckpt={folder}" in r.stdout
    return folder


def test_exported_folder(trained, exported):
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "generation_config.json", "meta.json",
                                            "model.safetensors", "samples"]
    ckpt = torch.load(f"{trained['out']}/best.pt", weights_only=True)
    args = ckpt["model_args"]
    with safe_open(f"{exported}/model.safetensors", framework="pt") as f:
        names = set(f.keys())
        # transformers' GPT-2: the embedding without its padding rows (lm_head is tied to it), Conv1D = Linear^T
        assert torch.equal(f.get_tensor("transformer.wte.weight"), ckpt["model"]["lm_head.weight"][:args["vocab_size"]])
        c_fc = "transformer.h.0.mlp.c_fc.weight"
        assert torch.equal(f.get_tensor(c_fc), ckpt["model"][c_fc].t())
        assert not f.get_tensor("transformer.h.1.attn.c_attn.bias").any()  # bias=False: zeros
    assert "lm_head.weight" not in names and set(ckpt["model"]) - {"lm_head.weight"} < names
    with open(f"{exported}/config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["vocab_size"], config["n_positions"], config["n_layer"], config["bias"]) == \
        (args["vocab_size"], args["block_size"], args["n_layer"], False)
    with open(f"{exported}/meta.json") as f:
        meta = json.load(f)
    assert meta["layout"] == ckpt["meta"]["layout"] and meta["codec"] == os.path.basename(ckpt["meta"]["codec"])
    assert "shards" not in meta and meta["training"]["iter_num"] == 2
    assert meta["training"]["tokens_seen"] == 2 * 8 * 2 * 32  # iterations x accumulation x batch x block
    card = open(f"{exported}/README.md", encoding="utf-8").read()
    val = [r for r in read_log(trained["out"]) if r["iter"] == 2 and "val_loss" in r][0]
    assert card.startswith("---\n") and "license: apache-2.0\n" in card.split("\n---\n")[0]
    assert "python generate.py --ckpt=alice/gpt2o-tiny --num_samples=4 --seconds=10" in card
    assert f"val loss {val['val_loss']:.4f}" in card and f"{val['val_bps']:.0f} bits per second" in card
    assert "2 iterations, 1,024 tokens seen" in card
    assert os.listdir(f"{exported}/samples") == ["iter000002_uncond0.wav"]
    assert '<audio controls src="samples/iter000002_uncond0.wav">' in card


def test_greedy_tokens_from_exported_folder_equal_the_checkpoints(trained, exported):
    models = []
    for source in (f"{trained['out']}/best.pt", exported):
        ckpt = load_model_source(source)
        models.append(GPT.from_checkpoint(ckpt).eval())
        layout = Layout.from_meta(ckpt["meta"])
    assert models[1].transformer.wte.weight is models[1].lm_head.weight
    a, b = (generate_tokens(m, layout, None, 12, num_samples=2, temperature=0.0) for m in models)
    assert torch.equal(a, b)
    random = GPT(models[0].config).eval()  # control: other weights give other tokens
    assert not torch.equal(a, generate_tokens(random, layout, None, 12, num_samples=2, temperature=0.0))


def hub_cache(folder: str, cache: str, repo_id: str) -> None:
    """Put an exported folder into a Hugging Face cache the way snapshot_download stores a model repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(folder, os.path.join(repo, "snapshots", commit))


def test_generate_from_pt_folder_and_hub_id_alike(trained, exported, tmp_path):
    quiet = save_random_snac(str(tmp_path / "quiet"), {**SNAC_24KHZ_CONFIG, "noise": False})  # same tokens: same audio
    hub_cache(exported, str(tmp_path / "hub"), "alice/gpt2o-tiny")
    wavs = []
    for i, source in enumerate([f"{trained['out']}/best.pt", "alice/gpt2o-tiny"]):
        r = run("generate.py", f"--ckpt={source}", f"--out_dir={tmp_path}/{i}", "--num_samples=1", "--seconds=0.2",
                "--temperature=0", "--device=cpu", f"--codec={quiet}", HF_HUB_CACHE=str(tmp_path / "hub"))
        assert r.returncode == 0, r.stderr
        wavs.append(open(f"{tmp_path}/{i}/sample_0.wav", "rb").read())
    assert wavs[0] == wavs[1]
    assert_one_line_error(run("generate.py", "--ckpt=alice/not-there", f"--out_dir={tmp_path}/x",
                              HF_HUB_CACHE=str(tmp_path / "hub")), "alice/not-there", "Hugging Face Hub")
    assert_one_line_error(run("generate.py", f"--ckpt={trained['out']}", f"--out_dir={tmp_path}/x"),
                          "not a folder written by export.py", "best.pt")


def test_push_fails_offline_in_one_line_and_the_folder_is_ready(trained, tmp_path):
    for env in ({"HF_HUB_OFFLINE": "1"},  # offline mode: huggingface_hub refuses the call
                {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"}):  # no server
        out = str(tmp_path / f"push{len(env)}")
        r = run("export.py", f"--ckpt={trained['out']}/ckpt.pt", f"--out={out}", "--repo_id=alice/tiny", "--push",
                **env)
        assert_one_line_error(r, "push to the Hugging Face Hub failed", f"the folder {out} is ready")
        assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "meta.json",
                                           "model.safetensors", "samples"]
    assert_one_line_error(run("export.py", f"--ckpt={trained['out']}/ckpt.pt", "--push"), "repo_id")


@pytest.mark.slow
def test_export_writes_atomically_and_never_clobbers(trained, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    r = run("export.py", f"--ckpt={trained['out']}/ckpt.pt", f"--out={other}")
    assert_one_line_error(r, "not an earlier export")
    assert os.listdir(other) == ["mine.txt"]
    out = tmp_path / "model"
    for flags in ([], ["--overwrite=True"]):  # the second export replaces the first
        assert run("export.py", f"--ckpt={trained['out']}/ckpt.pt", f"--out={out}", *flags).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["model", "notes"]  # no temp folders left behind
    assert_one_line_error(run("export.py", f"--ckpt={tmp_path}/none.pt", f"--out={tmp_path}/x"), "none.pt", "not found")


@pytest.mark.slow
def test_init_from_exported_folder_fine_tunes_from_its_weights(trained, exported, tmp_path):
    out = str(tmp_path / "tuned")
    # the command line asks for another architecture: the published weights decide it
    r = run_train(TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}", f"--init_from={exported}",
                          "--n_layer=3", "--max_iters=2", "--eval_interval=2", "--log_interval=1"])
    assert r.returncode == 0, r.stderr
    before = [x for x in read_log(trained["out"]) if "val_loss" in x][-1]
    after = [x for x in read_log(out) if "val_loss" in x]
    # iteration 0 of the fine-tune evaluates the published weights on the same val windows; the export leaves out
    # the embedding's padding rows (never sampled, but in the training softmax), which moves the loss a little
    assert after[0]["iter"] == 0 and abs(after[0]["val_loss"] - before["val_loss"]) < 1e-3
    ckpt = torch.load(f"{out}/ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["config"]["init_from"] == exported
    steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2.0}  # a fresh optimizer: 2 steps here, not the 2 of the first run on top

    other = write_dataset(str(tmp_path / "other"), [400], [100])
    with open(f"{other}/meta.json") as f:
        meta = json.load(f)
    with open(f"{other}/meta.json", "w") as f:
        json.dump({**meta, **Layout((4, 2, 1), 2048).meta()}, f)
    r = run_train(TINY + [f"--data_dir={other}", f"--out_dir={tmp_path}/x", f"--init_from={exported}"])
    assert_one_line_error(r, f"init_from={exported}", "codebook_size")
    r = run_train(TINY + [f"--data_dir={other}", f"--out_dir={tmp_path}/x", "--init_from=resum"])
    assert_one_line_error(r, "init_from=resum", "resume")


def test_export_replaces_only_the_files_it_wrote(trained, tmp_path, small_disk):
    ckpt = f"--ckpt={trained['out']}/ckpt.pt"
    mine = tmp_path / "mine"  # looks like an export, is not one of ours
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"")
    (mine / "NOTES.md").write_text("x")
    assert_one_line_error(run("export.py", ckpt, f"--out={mine}", "--overwrite=True"), "not an earlier export")
    assert sorted(os.listdir(mine)) == ["NOTES.md", "model.safetensors"] and (mine / "NOTES.md").read_text() == "x"
    out = tmp_path / "out"
    assert run("export.py", ckpt, f"--out={out}").returncode == 0
    ours = sorted(os.listdir(out))
    (out / "NOTES.md").write_text("my notes")
    (out / "samples" / "mine.wav").write_bytes(b"RIFF")
    assert_one_line_error(run("export.py", ckpt, f"--out={out}"), "earlier export", "--overwrite=True")
    r = run("export.py", ckpt, f"--out={out}", "--overwrite=True")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(ours + ["NOTES.md"]) and (out / "NOTES.md").read_text() == "my notes"
    assert (out / "samples" / "mine.wav").read_bytes() == b"RIFF"
    with open(out / "meta.json") as f:
        listed = json.load(f)["export"]["files"]
    assert sorted(listed) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                             "samples/iter000002_uncond0.wav"]
    card = (out / "README.md").read_text() + "\nMy own words.\n"  # an edited model card is the user's now
    (out / "README.md").write_text(card)
    assert_one_line_error(run("export.py", ckpt, f"--out={out}", "--overwrite=True"), "README.md", "edited")
    assert (out / "README.md").read_text() == card
    link = tmp_path / "link"
    link.symlink_to(out)
    assert_one_line_error(run("export.py", ckpt, f"--out={link}", "--overwrite=True"), "symbolic link")
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["link", "mine", "out"]  # no temp folders left
    folder, preexec = small_disk(64 * 1024)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), ckpt, f"--out={folder}/x"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                       timeout=300, preexec_fn=preexec)
    line = assert_one_line_error(r, f"error: {folder}/x/model.safetensors: ", "--out is as it was")
    assert ("needs about 1.7 MB" in line) if preexec is None else ("ulimit -f" in line), line
    assert os.listdir(folder) == []


@pytest.mark.parametrize("change,words", [({"model_type": "llama"}, "model_type 'llama', expected 'gpt2'"),
                                          ({"n_layer": 3}, "n_layer=3, but the weights hold n_layer=2"),
                                          ({"vocab_size": 99999}, "vocab_size=99999, but the weights hold"),
                                          ({"n_positions": -1}, "block_size=-1, expected a whole number")])
def test_a_bad_config_json_is_one_line(exported, trained, tmp_path, change, words):
    folder = str(tmp_path / "bad")
    shutil.copytree(exported, folder)
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    with open(f"{folder}/config.json", "w") as f:
        json.dump({**config, **change}, f)
    with pytest.raises(ValueError, match=f"model config {folder}/config.json: ") as e:
        load_model_source(folder)
    assert words in str(e.value), str(e.value)
    if "model_type" in change:  # the scripts say it in one line
        assert_one_line_error(run("generate.py", f"--ckpt={folder}", f"--out_dir={tmp_path}/wav"), "config.json", words)
    if "n_positions" in change:
        r = run_train(TINY + [f"--data_dir={trained['data']}", f"--out_dir={tmp_path}/t", f"--init_from={folder}"])
        assert_one_line_error(r, "config.json", words)
