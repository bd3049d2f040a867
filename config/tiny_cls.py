# tiny_cls: a 4-layer, 64-wide GPT classifies 8x8 handwritten digits read as 64 pixel tokens
# (17 gray levels): <IMG> <Z_..> x 64 </IMG> <CLS> <CLS_k> <EOS>; loss on the class token plus
# 0.1 x next-pixel loss.
# python prepare/tiny_cls.py          # embedded UCI digits, 4 shifted copies of each train image
# python train.py config/tiny_cls.py
# python sample.py --out_dir=weight/tiny_cls --classify
dataset = "tiny_cls"
out_dir = "weight/tiny_cls"
device = "cpu"
block_size = 68  # 69-token examples: x and y are 68 long
batch_size = 64
n_layer = 4
n_head = 4
n_embd = 64
dropout = 0.0
# a little next-pixel loss on the image tokens helps the class token (docs/lab-notes.md)
prompt_loss_weight = 0.1
# Muon on the block matrices, AdamW on embeddings: far ahead of AdamW alone here (docs/lab-notes.md)
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
max_iters = 600
lr_decay_iters = 0  # = max_iters, also when --max_iters overrides it
min_lr = 3e-5
warmup_iters = 50
beta2 = 0.99
weight_decay = 0.1
eval_interval = 200
eval_iters = 6  # 6 x 64 covers the whole val split (359 examples); accuracy always uses all of it
log_interval = 50
always_save_checkpoint = True  # the classify command evaluates the final, fully decayed weights
