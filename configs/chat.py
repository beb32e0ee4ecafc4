"""Chat fine-tuning: a text+audio model (configs/ljspeech.py's, or a LibriTTS one) learns to answer spoken or typed
questions with text, then speech, from a folder of .jsonl conversations (chats.py describes a line).

    python prepare_audio.py --dataset=/data/chats --out_dir=data/chat --val_files=50   # .jsonl + their audio
    python train.py configs/chat.py --init_from=out/ljspeech/best.pt    # or an export.py folder, or a Hub id

Model. The architecture comes with --init_from; the chat layout adds three role tokens (SYSTEM, USER,
ASSISTANT) after the text+audio layout's ids, so the model grows three embedding rows and keeps every other id's
meaning. The loss counts assistant turns only (the loss mask prepare_audio.py writes beside each shard), and eval
reports the assistant's text loss (val_text_loss) and audio loss (val_audio_loss) apart.

Schedule. Fine-tuning, not pre-training: a tenth of the pre-training learning rate, a short warm-up, and few
iterations (conversation sets are small next to the speech the model learnt from); 16 x 1024 tokens x 2 micro-steps
= 32k tokens per iteration. best.pt keeps the lowest val loss, which is the assistant's alone.
"""
out_dir = "out/chat"
data_dir = "data/chat"
dropout = 0.1
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 1e-4
min_lr = 1e-5
beta2 = 0.99
weight_decay = 0.1
max_iters = 1000
warmup_iters = 50
eval_interval = 100
eval_iters = 20
log_interval = 10
