"""GPT-2 medium (350M) speaking: GPT-2's weights, then ~1,000 h of transcribed speech, on 8 GPUs of 40 GB or more.

    python prepare_audio.py --dataset=<owner>/<parquet-dataset> --out_dir=data/speech --max_hours=1000 --val_files=500
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_medium.py
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_medium.py --init_from=resume
    python train.py configs/gpt2_medium.py --batch_size=4 --gradient_accumulation_steps=128   # one 24 GB card

Model. GPT-2 medium's shape (24 layers x 1024, 16 heads) and its weights (init_from): the text ids of the
text+audio layout are GPT-2's own BPE ids, so their embeddings and the whole stack start as GPT-2; the 12,293
audio and special rows start random. The layout's 62,550 ids pad to 62,592 rows (50,304 in GPT-2: its extra rows
are dropped, ours are new). block_size is GPT-2's 1024 positions: 12.5 s of audio, one clip of a TTS corpus with
its transcript. Data: 1,000 h is ~295M audio tokens plus ~15M of text.

Batch. 16 x 1024 tokens per micro-step, 32 micro-steps for the job (4 per GPU on 8): 524k tokens per iteration,
GPT-2's and GPT-3 medium's batch; ~590 iterations per epoch, so 2,000 iterations is ~3.4 epochs (1.05B tokens),
about where a model this size stops gaining from repeats of 300M tokens (Muennighoff et al., 2023: up to ~4
epochs are nearly as good as new data). The memory plan at start says what a card holds: ~36 GB per process here.

Learning rate. GPT-3's 3e-4 for this size with its batch of 0.5M tokens, warmup 200 iterations (the new audio
rows start from noise and their first gradients are large), cosine to 3e-5 at max_iters; AdamW's beta2 0.95 and
weight decay 0.1 as in GPT-3. No dropout: ~1B tokens for 350M parameters is not the small-data regime.
"""
out_dir = "out/gpt2_medium"
data_dir = "data/speech"
init_from = "gpt2-medium"
n_layer = 24
n_head = 16
n_embd = 1024
dropout = 0.0
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32
learning_rate = 3e-4
min_lr = 3e-5
beta2 = 0.95
weight_decay = 0.1
max_iters = 2000
warmup_iters = 200
eval_interval = 250
eval_iters = 20
log_interval = 10
