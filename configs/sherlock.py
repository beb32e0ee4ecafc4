"""The Sherlock Holmes audiobook (~12 h, ~3.5M tokens) on one 12-24 GB GPU:
    python prepare_audio.py && python train.py configs/sherlock.py

Model size. 3.5M tokens is tiny for a language model: the original project's 124M-parameter GPT-2 saw each
token ~0.03 times per parameter and memorised the chapters (train loss falling, val loss rising). We follow
nanoGPT's shakespeare-char recipe, the known-good regime for ~1M-token data (10.7M parameters, ~0.1 tokens
per parameter, dropout 0.2): 8 layers x 512 wide = 25.2M non-embedding + 6.3M tied embedding parameters,
~0.11 tokens per parameter, dropout 0.2 and weight decay 0.1, and best.pt keeps the lowest val loss, so going
past the point where it starts to overfit loses nothing.

Batch. 8 x 2048 tokens (25 s of audio) per micro-step fits 12 GB in bf16 with flash attention; 4 micro-steps
make 65k tokens (13 min of audio) per iteration, ~50 iterations per epoch, so 2500 iterations is ~47 epochs.

Colab T4 (16 GB, no bf16): dtype auto picks float16 with loss scaling; use half the batch and twice the
accumulation (the same 65k tokens per iteration, so the same training):
    python train.py configs/sherlock.py --batch_size=4 --gradient_accumulation_steps=8
"""
out_dir = "out/sherlock"
data_dir = "data/sherlock"
n_layer = 8
n_head = 8
n_embd = 512
dropout = 0.2
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 4
learning_rate = 1e-3  # a small model tolerates a larger step (shakespeare-char uses 1e-3)
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration: a longer second-moment average is steadier
weight_decay = 0.1
max_iters = 2500
warmup_iters = 100
eval_interval = 100
eval_iters = 20  # 160 fixed val windows x 2048 tokens: about as many tokens as the ~1 h val chapter
log_interval = 10
