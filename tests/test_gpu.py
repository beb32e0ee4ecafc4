"""Checks that need a CUDA GPU; each skips itself without one. Timings are in bench.py (`python bench.py watch`)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -----------------------------------------------------------------------------
# issue 11: eval samples on the GPU leave training's CUDA RNG alone and decode on the device

def test_eval_samples_on_cuda_leave_the_cuda_rng_alone(codec_dir, tmp_path):
    import report
    from model import GPT, GPTConfig
    from tokenizer import load_codec
    meta = load_codec(codec_dir).meta()
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=256, n_layer=2, n_head=2, n_embd=64,
                          dropout=0.1)).cuda()
    samples = report.EvalSamples(str(tmp_path), meta, 2, 1.0, "cuda", seed=1)
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    row = samples(model, 0)
    assert row["sample_s"] > 0 and model.training
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(cuda, torch.cuda.get_rng_state())
    assert len(report.list_samples(str(tmp_path))[0]) == 2
    print(f"2 x 1 s eval samples on {torch.cuda.get_device_name()}: {row['sample_s']:.2f} s (codec load included)")
