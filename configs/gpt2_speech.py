"""GPT-2 124M fine-tuned to speak and transcribe on LJSpeech-style data (one reader, short transcribed clips), on
one 24-80 GB GPU: the text half of the model starts as GPT-2, the audio half is learnt.

    python prepare_audio.py --dataset=LJSpeech-1.1 --out_dir=data/ljspeech --val_files=100   # GPT-2's BPE (auto)
    python train.py configs/gpt2_speech.py
    python generate.py --ckpt=out/gpt2_speech/best.pt --text="It is a capital mistake to theorize before one has data."

Model. init_from=gpt2 sets the architecture: 12 layers x 768, 12 heads, biases, tanh GELU; the n_layer/n_embd/
bias/gelu below only restate it so that --init_from=resume (which checks them) continues this run. The 50,257
text rows keep GPT-2's ids; 3 x 4,096 audio rows and 5 special rows are added (the mean of the text rows plus a
little noise), so the vocab is 62,550 and the model 134M parameters (85M in the blocks, 48M tied embedding).

Batch. GPT-2 has 1024 positions, so block_size is 1024 (a longer one is refused): a clip of at most ~10 s is ~900
tokens with its text. 8 x 1024 per micro-step, 8 micro-steps = 65k tokens per iteration, as configs/ljspeech.py,
so ~115 iterations per epoch of LJSpeech's ~7.5M tokens; 3000 iterations is ~26 epochs, fewer than from scratch:
the text side needs no learning and the 124M model overfits 24 h of audio sooner than ljspeech.py's 57M one.

Rates. Fine-tuning wants a gentler step than training from scratch (nanoGPT's finetune_shakespeare uses 3e-5 for
gpt2-xl): 3e-4 peak with 100 warm-up steps keeps GPT-2's text weights from being thrown away in the first
iterations while the new audio rows, which start near the mean, move quickly; dropout 0.1 is GPT-2's own.
"""
out_dir = "out/gpt2_speech"
data_dir = "data/ljspeech"
init_from = "gpt2"
n_layer = 12
n_head = 12
n_embd = 768
bias = True
gelu = "tanh"
dropout = 0.1
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 8
learning_rate = 3e-4
min_lr = 3e-5
beta2 = 0.99
weight_decay = 0.1
max_iters = 3000
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 10
