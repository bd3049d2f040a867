# tiny_cls with a classification head: the <CLS> hidden state -> Linear(64, 32) -> GELU ->
# Linear(32, 10), trained with cross-entropy on the class alone (one target per example), where
# config/tiny_cls.py reads the class token off the LM head. Same model, data and schedule.
# python prepare/tiny_cls.py
# python train.py config/tiny_cls_mlp.py
# python sample.py --out_dir=weight/tiny_cls_mlp --classify
dataset = "tiny_cls"
out_dir = "weight/tiny_cls_mlp"
device = "cpu"
block_size = 68  # 69-token examples: x and y are 68 long
batch_size = 64
n_layer = 4
n_head = 4
n_embd = 64
dropout = 0.0
cls_head = "mlp"
prompt_loss_weight = 0.0  # the head learns from the class alone: no next-pixel loss
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
