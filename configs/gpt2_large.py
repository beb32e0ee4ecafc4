"""GPT-2 large (774M) speaking: GPT-2's weights, then ~1,000 h of transcribed speech, sharded over 8 GPUs.

    python prepare_audio.py --dataset=<owner>/<parquet-dataset> --out_dir=data/speech --max_hours=1000 --val_files=500
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_large.py
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_large.py --activation_checkpointing=True  # 24 GB
    python export.py --ckpt=out/gpt2_large/best --out=exported/gpt2_large   # the sharded best/ folder, gathered

Model. GPT-2 large's shape (36 layers x 1280, 20 heads) and weights, as in configs/gpt2_medium.py (whose
docstring explains the layout and block_size). Weights, gradients and AdamW's state are 16 bytes a parameter,
12.4 GB: FSDP shards them, 1.6 GB per GPU on 8, and leaves the room to activations (the memory plan printed at
start: ~43 GB per process here; with --activation_checkpointing ~18 GB, for about a third more compute).

Batch. The same 524k tokens per iteration as medium (16 x 1024 per micro-step, 32 micro-steps for the job), and
the same 2,000 iterations (~3.4 epochs of 1,000 h): larger models gain more per token, not from more epochs.

Learning rate. GPT-3's 2.5e-4 for this size, warmup 200, cosine to 2.5e-5; beta2 0.95, weight decay 0.1.
"""
out_dir = "out/gpt2_large"
data_dir = "data/speech"
init_from = "gpt2-large"
fsdp = True
n_layer = 36
n_head = 20
n_embd = 1280
dropout = 0.0
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32
learning_rate = 2.5e-4
min_lr = 2.5e-5
beta2 = 0.95
weight_decay = 0.1
max_iters = 2000
warmup_iters = 200
eval_interval = 250
eval_iters = 20
log_interval = 10
