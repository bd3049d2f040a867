# The arithmetic chat demo (README "A chat demo whose answers can be checked"): a chat model
# trained from scratch on the chats of prepare/arith.py (a grammar of how people ask, English
# and Chinese), the loss on the assistant's turns only.
#   python prepare/arith.py && python train.py config/arith.py
#   python eval.py --out_dir=weight/arith --generate     # trained wordings, 200 new questions
#   python eval.py --out_dir=weight/arith --generate --prompts=data/arith/val_wordings.jsonl
#   python sample.py --out_dir=weight/arith --chat
# No pretraining: two thirds of a plain-text corpus of these problems are operands no model can
# predict, and the time is better spent on answers (pretrain + SFT gave 86.5% in 24 minutes).
# The speedrun architecture: rotary, RMSNorm, QK-norm, ReLU^2, Muon.
dataset = "arith"
out_dir = "weight/arith"
device = "auto"
block_size = 128  # chats are at most 128 characters (prepare/arith.py MAX_CHARS + chat tokens)
# Steps of 128 chats in 4 micro-batches: group_by_length sorts each step by length first, so
# a micro-batch pads little; 1.6x faster than one batch of 128 padded to its longest chat.
batch_size = 32
gradient_accumulation_steps = 4
n_layer = 4
n_head = 4
n_embd = 128
pos_emb = "rope"
norm = "rmsnorm"
qk_norm = True
mlp = "relu2"
bias = False
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.0
lr_schedule = "wsd"
warmup_iters = 20
max_iters = 1500
eval_interval = 300
eval_iters = 7  # 7 x 32 covers the 200 val chats
log_interval = 100
