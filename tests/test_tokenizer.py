"""The token layout (exact order, both directions, 3 and 4 levels), repair of generated streams, encoding of any
rate/channel count, codec loading and its errors, and chunked encoding against one pass."""
import os

import numpy as np
import pytest
import torch

from conftest import SNAC_24KHZ_CONFIG, save_random_snac, synth_audio
from codec import load_codec
from tokenizer import LAYOUT_NAME, Layout

CB = 4096


def random_codes(rng, strides, batch, n_frames):
    return [rng.integers(0, CB, size=batch + (n_frames * (strides[0] // s),)) for s in strides]


def test_layout_24khz_order_and_round_trip():
    layout = Layout((4, 2, 1), CB)
    rng = np.random.default_rng(0)
    l0, l1, l2 = random_codes(rng, (4, 2, 1), (3,), 9)
    tokens = layout.codes_to_tokens([l0, l1, l2])
    assert tokens.shape == (3, 9 * 7) and tokens.dtype == np.int64
    for b in range(3):  # the order, written out by hand
        expected = []
        for i in range(9):
            expected += [l0[b, i], CB + l1[b, 2 * i], 2 * CB + l2[b, 4 * i], 2 * CB + l2[b, 4 * i + 1],
                         CB + l1[b, 2 * i + 1], 2 * CB + l2[b, 4 * i + 2], 2 * CB + l2[b, 4 * i + 3]]
        assert tokens[b].tolist() == expected
    assert layout.frame_size == 7 and layout.frame_levels.tolist() == [0, 1, 2, 2, 1, 2, 2]
    assert layout.boundary_id == 3 * CB and layout.vocab_size == 3 * CB + 1
    back = layout.tokens_to_codes(tokens)
    assert all(np.array_equal(a, b) for a, b in zip(back, [l0, l1, l2]))
    # torch in, torch out, same values; unbatched works too
    t = layout.codes_to_tokens([torch.from_numpy(c) for c in (l0, l1, l2)])
    assert torch.is_tensor(t) and np.array_equal(t.numpy(), tokens)
    assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(layout.tokens_to_codes(t), (l0, l1, l2)))
    assert np.array_equal(layout.codes_to_tokens([l0[1], l1[1], l2[1]]), tokens[1])
    meta = layout.meta()
    assert meta["layout"] == LAYOUT_NAME and Layout.from_meta(meta) == layout


def test_layout_4_levels():
    layout = Layout((8, 4, 2, 1), CB)
    # depth-first: (level, index within the frame's codes of that level)
    order = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (2, 1), (3, 2), (3, 3),
             (1, 1), (2, 2), (3, 4), (3, 5), (2, 3), (3, 6), (3, 7)]
    rng = np.random.default_rng(1)
    codes = random_codes(rng, (8, 4, 2, 1), (2,), 5)
    tokens = layout.codes_to_tokens(codes)
    per_level = [1, 2, 4, 8]
    expected = [[lvl * CB + codes[lvl][b, i * per_level[lvl] + j] for i in range(5) for lvl, j in order]
                for b in range(2)]
    assert tokens.tolist() == expected
    assert layout.frame_size == 15 and layout.vocab_size == 4 * CB + 1
    back = layout.tokens_to_codes(torch.from_numpy(tokens))
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(back, codes))


def test_tokens_to_codes_rejects_partial_frames_and_wrong_levels():
    layout = Layout((4, 2, 1), CB)
    tokens = layout.codes_to_tokens(random_codes(np.random.default_rng(2), (4, 2, 1), (2,), 4))
    with pytest.raises(ValueError, match="whole number"):
        layout.tokens_to_codes(tokens[:, :-1])
    bad = tokens.copy()
    bad[1, 9] = 5  # position 2 of frame 1 needs a level-2 id
    with pytest.raises(ValueError, match="token 9 of row 1 .*level-2"):
        layout.tokens_to_codes(bad)
    with pytest.raises(ValueError, match="level-0"):
        layout.tokens_to_codes(torch.full((7,), layout.boundary_id))


def test_repair_makes_any_stream_decodable(tok):
    layout = tok.layout
    rng = np.random.default_rng(3)
    for n in (0, 1, 6, 7, 23, 60):
        garbage = rng.integers(-3, layout.vocab_size + 50, size=n)
        garbage[rng.random(n) < 0.1] = layout.boundary_id
        fixed = layout.repair(garbage)
        n_valid = int(((garbage >= 0) & (garbage < layout.boundary_id)).sum())
        assert len(fixed) == n_valid // 7 * 7
        layout.tokens_to_codes(fixed)  # every id is now at its frame position's level
        audio = tok.decode(garbage)
        assert audio.dtype == np.float32 and len(audio) == len(fixed) // 7 * tok.frame_hop and np.isfinite(audio).all()
    good = layout.codes_to_tokens(random_codes(rng, (4, 2, 1), (), 3))
    assert np.array_equal(layout.repair(good), good)  # a valid stream is left alone


@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 2), (44100, 2), (48000, 1), (24000, 3)])
def test_encode_any_rate_and_channels(tok, rate, channels):
    # just past a frame edge, where rounding the resampled length (as soxr does) would lose the last frame
    n = 4 * 2048 * rate // 24000 + 1
    tokens = tok.encode(synth_audio(n / rate, rate, channels, seed=rate), rate)
    frames = -(-n * 24000 // (rate * 2048))
    assert frames == 5 and tokens.shape == (frames * 7,)
    tok.layout.tokens_to_codes(tokens)


def test_encode_downmixes_channels(tok):
    mono = synth_audio(0.3, 24000, seed=4)
    assert np.array_equal(tok.encode(np.stack([mono, mono], axis=1), 24000), tok.encode(mono, 24000))
    with pytest.raises(ValueError, match=r"\(samples, channels\)"):
        tok.to_mono(np.zeros((2, 24000), np.float32), 24000)


def test_load_codec_from_local_folder(tok, codec_dir):
    assert tok.sample_rate == 24000 and tok.frame_hop == 2048 and tok.tokens_per_second == 24000 / 2048 * 7
    meta = tok.meta()
    assert meta["codec"] == codec_dir and meta["n_levels"] == 3 and meta["codebook_size"] == CB
    assert meta["special_tokens"] == {"boundary": 3 * CB} and meta["vocab_size"] == 3 * CB + 1


def test_load_codec_errors(tmp_path, codec_dir, monkeypatch):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text((open(os.path.join(codec_dir, "config.json")).read()))
    with pytest.raises(ValueError, match="missing pytorch_model.bin"):
        load_codec(str(folder))
    # weights of the 3-level codec under a 4-level config
    (folder / "config.json").write_text('{"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], '
                                        '"decoder_dim": 64, "decoder_rates": [8, 8, 4, 2], "attn_window_size": null, '
                                        '"vq_strides": [8, 4, 2, 1]}')
    os.symlink(os.path.join(codec_dir, "pytorch_model.bin"), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot be loaded into SNAC"):
        load_codec(str(folder))
    (folder / "config.json").write_text('{"no_such_arg": 1}')
    with pytest.raises(ValueError, match="not a SNAC config"):
        load_codec(str(folder))
    with pytest.raises(ValueError, match="not a folder and not a Hub id"):
        load_codec(str(tmp_path / "nothing-here"))
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--codec"):
        load_codec("nobody-gpt2o/no-such-codec")


def test_four_level_codec_encodes_and_decodes(tmp_path):
    config = dict(SNAC_24KHZ_CONFIG, encoder_dim=8, decoder_dim=16, vq_strides=[8, 4, 2, 1], codebook_size=64)
    tok4 = load_codec(save_random_snac(str(tmp_path / "snac4"), config))
    assert tok4.frame_hop == 512 * 8 and tok4.layout.frame_size == 15
    tokens = tok4.encode(synth_audio(1.0, 24000, seed=5), 24000)
    assert len(tokens) == -(-24000 // 4096) * 15
    assert len(tok4.decode(tokens)) == 6 * 4096


def test_chunk_margin_matters(tok):
    # the control for the test below: with no margin, chunk edges see zero padding instead of their neighbours
    audio = tok.to_mono(synth_audio(6.0, 24000, seed=6), 24000)
    one = torch.cat(tok.encode_codes(audio, chunk_seconds=1000))
    no_margin = torch.cat(tok.encode_codes(audio, chunk_seconds=2.0, margin_seconds=0.0))
    assert one.shape == no_margin.shape and (no_margin == one).float().mean() < 0.99


def test_chunked_batched_encode_matches_one_pass(tok):
    # three clips, two longer than a chunk, through the codec together: 2 s chunks with 0.77 s margins, chunks of
    # equal length from different clips share a call (bench.py prepare checks the same on two minutes of audio)
    clips = [tok.to_mono(synth_audio(seconds, 24000, seed=7 + i), 24000) for i, seconds in enumerate((5.0, 3.5, 1.3))]
    calls = []
    encode = tok.codec.encode
    tok.codec.encode = lambda x: calls.append(tuple(x.shape)) or encode(x)  # count the calls, nothing else
    try:
        batched = tok.encode_many(clips, chunk_seconds=2.0, batch_seconds=12.0)
    finally:
        del tok.codec.encode
    assert len(calls) < sum(len(tok.chunk_plan(len(c), 2.0)) for c in clips) and max(b for b, _, _ in calls) > 1
    for clip, codes in zip(clips, batched):
        one = torch.cat(tok.encode_codes(clip, chunk_seconds=1000))  # a single codec call
        assert torch.cat(codes).shape == one.shape == (tok.n_frames(len(clip)) * 7,)
        assert (torch.cat(codes) == one).float().mean() >= 0.99


def test_batch_seconds_counts_chunks_without_their_margins(tok):
    # five whole ~2 s chunks: the first and last are encoded with one 0.77 s margin (2.7 s), the three in the
    # middle with two (3.5 s). batch_seconds=6 is three chunks per call, as 4 x 60 s is four on CUDA: margins
    # counted, it would be one 3.5 s chunk per call
    clip = tok.to_mono(synth_audio(10.0, 24000, seed=3), 24000)[:5 * tok.chunk_samples(2.0)]
    calls = []
    encode = tok.codec.encode
    tok.codec.encode = lambda x: calls.append(x.shape[0]) or encode(x)  # count the rows per call, nothing else
    try:
        codes = tok.encode_many([clip], chunk_seconds=2.0, batch_seconds=6.0)[0]
    finally:
        del tok.codec.encode
    assert sorted(calls) == [2, 3]
    assert (torch.cat(codes) == torch.cat(tok.encode_codes(clip, chunk_seconds=1000))).float().mean() >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_encode_on_cuda_matches_one_pass(codec_dir):
    # what prepare_audio.py does on a GPU: pinned host batches, codes read back only at the end
    tok = load_codec(codec_dir, device="cuda")
    clips = [tok.to_mono(synth_audio(seconds, 24000, seed=9 + i), 24000) for i, seconds in enumerate((30.0, 12.5))]
    for clip, codes in zip(clips, tok.encode_many(clips, chunk_seconds=5.0, batch_seconds=20.0)):
        one = torch.cat(tok.encode_codes(clip, chunk_seconds=1000))
        assert codes[0].device.type == "cuda" and (torch.cat(codes) == one).float().mean() >= 0.99
