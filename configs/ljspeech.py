"""LJSpeech (24 h, one reader, 13,100 transcribed clips of 1-10 s; public domain) on one 16-24 GB GPU: a model that
reads a given sentence aloud (--text) and writes what it hears (--transcribe).

    wget https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2 && tar xjf LJSpeech-1.1.tar.bz2
    python prepare_audio.py --dataset=LJSpeech-1.1 --out_dir=data/ljspeech --val_files=100
    python train.py configs/ljspeech.py
    python generate.py --ckpt=out/ljspeech/best.pt --text="It is a capital mistake to theorize before one has data."
    python generate.py --ckpt=out/ljspeech/best.pt --transcribe=LJSpeech-1.1/wavs/LJ001-0001.wav

Data. ~7.1M audio tokens (24 h x 82.03 tokens/s) and ~0.35M text tokens (GPT-2 BPE of the normalized
transcripts); half the clips are speech-from-text items [text][audio], half transcription items [audio][text]
(prepare_audio.py's --asr_fraction=0.5). The first 100 clips (sorted) are the val split.

Model. The vocab is 62,550 ids (50,257 text + 3 x 4,096 audio + 5 special), so the tied embedding alone is
62,592 x 512 = 32M parameters; 8 layers x 512 add 25.2M. Twice Sherlock's data, so the same shape as
configs/sherlock.py with less dropout.

Batch. A clip is at most ~10 s (~900 tokens with its text), so a 1024-token window holds a whole item and
usually part of the next; 16 x 1024 per micro-step, 4 micro-steps = 65k tokens per iteration, ~115 iterations
per epoch, so 5000 iterations is ~43 epochs; best.pt keeps the lowest val loss. A 12 GB card or a Colab T4:
--batch_size=8 --gradient_accumulation_steps=8 (the same 65k tokens per iteration).
"""
out_dir = "out/ljspeech"
data_dir = "data/ljspeech"
n_layer = 8
n_head = 8
n_embd = 512
dropout = 0.1
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 4
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.1
max_iters = 5000
warmup_iters = 200
eval_interval = 250
eval_iters = 20
log_interval = 10
