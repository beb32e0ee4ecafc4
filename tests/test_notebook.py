"""notebooks/colab.ipynb runs headless (nbclient + ipykernel) end to end with tiny settings and the offline codec,
so it cannot rot: prepare, train, listen, generate, report, export, and a push that fails offline in one line."""
import os
import sys

import nbformat
import pytest
import soundfile as sf
from nbclient import NotebookClient

from conftest import ROOT, TEXT_ENCODING, synth_audio

NOTEBOOK = os.path.join(ROOT, "notebooks", "colab.ipynb")
pytestmark = pytest.mark.slow


def test_colab_notebook_runs_headless(codec_dir, tmp_path, monkeypatch):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, seconds in enumerate([0.6, 1.2, 1.0]):
        sf.write(audio / f"chapter_{i}.flac", synth_audio(seconds, 16000, seed=i), 16000)
    out = tmp_path / "out"
    settings = {"DATASET": str(audio), "CODEC": codec_dir, "TEXT_ENCODING": TEXT_ENCODING,  # GPT-2's cannot download
                "DATA_DIR": str(tmp_path / "data"), "OUT_DIR": str(out),
                "EXPORT_DIR": str(tmp_path / "exported"), "SECONDS": "0.2", "HUB_REPO_ID": "alice/gpt2o-tiny",
                # the notebook's T4 flags, then a model and a run small enough for two CPU cores
                "TRAIN_ARGS": "configs/sherlock.py --batch_size=4 --gradient_accumulation_steps=8 --device=cpu "
                              "--compile=False --n_layer=2 --n_head=2 --n_embd=32 --block_size=64 --batch_size=2 "
                              "--gradient_accumulation_steps=1 --max_iters=4 --eval_interval=2 --eval_iters=1 "
                              "--log_interval=1 --eval_sample_seconds=0.2"}
    for key, value in settings.items():
        monkeypatch.setenv(f"GPT2O_{key}", value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; the push must fail in one line
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the notebook's `!python` is the first python on PATH: this one, also from a venv that is not activated
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
    assert len(install) == 1 and "pip install" in install[0].source
    from IPython.core.inputtransformer2 import TransformerManager
    compile(TransformerManager().transform_cell(install[0].source), "install cell", "exec")  # valid IPython at least
    nb.cells = [c for c in nb.cells if c not in install]  # no network here, and this checkout is installed
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/html", "")) for o in cell.outputs)

    outputs = [text(c) for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(outputs)
    assert "iter 4 | val loss" in everything and "| eta " in everything  # training ran to the end
    assert everything.count("<audio") >= 2 + 2  # eval samples and generated samples, played inline
    assert 'src="data:image/png;base64,' in everything  # the report's plots, shown in the notebook
    assert os.path.isfile(tmp_path / "exported" / "model.safetensors") and (out / "report.html").is_file()
    assert "license: mit" in everything  # the model card printed after export
    push = outputs[-1]
    assert "error: push to the Hugging Face Hub failed" in push and "is ready" in push
