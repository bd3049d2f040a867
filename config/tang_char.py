# A char-level Tang poem model: the Chinese Tiny Shakespeare (20,011 poems, 7,377 distinct
# characters, one token each). 4 layers x 128 and a 128-character context (a whole 8-line poem
# with its title and author), a few minutes on 2 CPU cores: a demo, not a poet (README,
# "Chinese end to end"). config/tang_bpe.py is the same model on a trained BPE.
# python prepare/text.py --input ../shared/data/zh/tang_poems.txt --name tang_char --tokenizer char --val_fraction 0.05
# python train.py config/tang_char.py
# python sample.py --out_dir=weight/tang_char --start="春" --max_new_tokens=100
dataset = "tang_char"
out_dir = "weight/tang_char"
device = "cpu"
block_size = 128
batch_size = 16
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 0  # = max_iters
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 50
weight_decay = 0.1
eval_interval = 200
eval_iters = 20
log_interval = 50
