"""The README's path end to end, as a user runs it: a folder of audio -> prepare_audio.py -> train.py -> generate.py.
Each script's own tests go deeper; this one catches drift between what one script writes and the next one reads."""
import json
import os

import soundfile as sf
import torch

from conftest import ROOT, TEXT_ENCODING, run_script, synth_audio


ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_prepare_train_generate(codec_dir, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, (seconds, rate, channels) in enumerate([(0.6, 22050, 1), (1.0, 44100, 2), (0.9, 16000, 1)]):
        sf.write(audio / f"chapter_{i}.flac", synth_audio(seconds, rate, channels, seed=i), rate)
    data, out, samples = tmp_path / "data", tmp_path / "out", tmp_path / "samples"
    # the default text+audio layout (audio-only documents here), with the test encoding in place of GPT-2's BPE
    run_script("prepare_audio.py", f"--dataset={audio}", f"--codec={codec_dir}", f"--out_dir={data}", "--device=cpu",
               f"--text_encoding={TEXT_ENCODING}", env=ENV, check=True)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["val"]["files"] == 1 and meta["splits"]["train"]["files"] == 2
    assert meta["layout"] == "snac-text-audio-v1" and meta["text_encoding"] == TEXT_ENCODING

    run_script("train.py", os.path.join(ROOT, "configs", "tiny.py"), f"--data_dir={data}", f"--out_dir={out}",
               "--block_size=64", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=1",
               "--eval_sample_seconds=0.5", env=ENV, check=True)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and ckpt["meta"]["codec"] == codec_dir  # generate.py finds the codec from here
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert (out / "samples" / "iter000004_uncond1.wav").is_file() and (out / "report.html").is_file()

    r = run_script("generate.py", f"--ckpt={out / 'ckpt.pt'}", f"--out_dir={samples}", "--num_samples=2",
                   "--seconds=0.5", "--device=cpu", env=ENV, check=True)
    for i in range(2):
        path = str(samples / f"sample_{i}.wav")
        assert path in r.stdout
        info = sf.info(path)
        # ceil(0.5 s / 85.3 ms) = 6 frames, unless the model ends its audio earlier (marked * in the summary line)
        ended = r.stdout.split("at --seconds: ")[1].splitlines()[0].split(", ")[i].endswith("*")
        assert info.samplerate == 24000 and (info.frames < 6 * 2048 if ended else info.frames == 6 * 2048)
