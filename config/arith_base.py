# Arithmetic chat demo, step 1: a char model pretrained on the problems written as plain
# sentences (prepare/arith.py writes them to data/arith_base). README "A chat demo whose answers
# can be checked". The speedrun architecture: rotary, RMSNorm, QK-norm, ReLU^2, Muon.
dataset = "arith_base"
out_dir = "weight/arith_base"
device = "auto"
block_size = 64
batch_size = 32
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
eval_interval = 250
eval_iters = 10
log_interval = 50
