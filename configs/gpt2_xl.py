"""GPT-2 XL (1.5B) speaking: GPT-2's weights, then ~1,000 h of transcribed speech: sharded, with activation
checkpointing, on 8 GPUs of 24 GB or more, or on one H200.

    python prepare_audio.py --dataset=<owner>/<parquet-dataset> --out_dir=data/speech --max_hours=1000 --val_files=500
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_xl.py
    python train.py configs/gpt2_xl.py          # one H200 (141 GB): a one-rank FSDP group, ~44 GB planned
    python export.py --ckpt=out/gpt2_xl/best --out=exported/gpt2_xl

Model. GPT-2 XL's shape (48 layers x 1600, 25 heads) and weights, as in configs/gpt2_medium.py (whose docstring
explains the layout and block_size). 1.56B parameters are 25 GB of float32 weights, gradients and AdamW state:
more than a 24 GB card before any activation. FSDP shards them (3.1 GB per GPU on 8) and activation checkpointing
keeps one Block's activations at a time (~18 GB per process at this batch, most of it the logits over the 62,592
vocabulary rows): the memory plan at start gives the figures for the machine it runs on.

Batch. 16 x 1024 per micro-step, 32 micro-steps for the job: 524k tokens per iteration, as for medium and large
(GPT-3 XL used 1M; at 1B tokens of data, more steps of half the size learn more). 2,000 iterations, ~3.4 epochs.

Learning rate. GPT-3's 2e-4 for this size, warmup 200, cosine to 2e-5; beta2 0.95, weight decay 0.1.
"""
out_dir = "out/gpt2_xl"
data_dir = "data/speech"
init_from = "gpt2-xl"
fsdp = True
activation_checkpointing = True
n_layer = 48
n_head = 25
n_embd = 1600
dropout = 0.0
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32
learning_rate = 2e-4
min_lr = 2e-5
beta2 = 0.95
weight_decay = 0.1
max_iters = 2000
warmup_iters = 200
eval_interval = 250
eval_iters = 20
log_interval = 10
