# Shakespeare-char on a GPU: a 6-layer, 6-head, 384-wide character model with a 256-char
# context (~10.7M parameters), nanoGPT's GPU recipe (not yet measured in danlu).
# python prepare/shakespeare_char.py --input ../shared/data/tinyshakespeare.txt
# python train.py config/shakespeare_char.py
dataset = "shakespeare_char"
out_dir = "weight/shakespeare_char"
eval_interval = 250  # the model overfits this small corpus: keep the best-val checkpoint
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

block_size = 256
batch_size = 64
gradient_accumulation_steps = 1
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small model tolerates a high rate
max_iters = 5000
lr_decay_iters = 0  # = max_iters, also when --max_iters overrides it
min_lr = 1e-4
beta2 = 0.99  # more tokens per step are few here, so average the second moment faster
warmup_iters = 100
