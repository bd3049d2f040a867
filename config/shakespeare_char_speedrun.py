# Shakespeare-char speedrun on a CPU: nanoGPT's CPU recipe (config/shakespeare_char_cpu.py)
# ends at val loss ~1.87-1.91 after 2000 iterations; this gets below 1.874 in 450, each
# cheaper, about 5x sooner on the same machine. The README's ablation table measures each switch.
# python prepare/shakespeare_char.py --input ../shared/data/tinyshakespeare.txt
# python train.py config/shakespeare_char_speedrun.py
# On a machine shared with other jobs, prefix OMP_NUM_THREADS=1: two threads that keep waiting
# for each other ran this 8x slower there (181 s) than one thread did (22 s).
dataset = "shakespeare_char"
out_dir = "weight/shakespeare_char_speedrun"
device = "cpu"
# smaller and shallower than nanoGPT's 4 x 128, whose steps learn more but cost twice as much
# (one thread, same load: 370 of its steps took 40 s to reach the target, 420 of these 22 s)
block_size = 64
batch_size = 12
n_layer = 3
n_head = 4
n_embd = 96
dropout = 0.0
bias = False
pos_emb = "rope"
norm = "rmsnorm"
qk_norm = True
mlp = "relu2"
# Muon on the block matrices, AdamW on embeddings / gains
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
weight_decay = 0.1
beta2 = 0.99
# no warmup; hold the rate, then decay linearly over the last 70% (warmup-stable-decay)
max_iters = 450
lr_schedule = "wsd"
warmup_iters = 0
cooldown_frac = 0.7
lr_decay_iters = 0  # = max_iters, also when max_iters is overridden
min_lr = 1e-4
# stop at the first evaluation at or below nanoGPT's final val loss; the loss only gets there
# in the cooldown, so a few evaluations suffice (each costs ~10 training steps)
target_val_loss = 1.874
eval_interval = 150
eval_iters = 20  # 20 x 12 x 64 = 15k val tokens, as nanoGPT's CPU recipe measures it
log_interval = 20
always_save_checkpoint = False
