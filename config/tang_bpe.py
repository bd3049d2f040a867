# The Tang poem model of config/tang_char.py on a trained byte-level BPE (8,192 ids, 0.80 tokens
# per character where GPT-2 needs 2.17), and the base of the Chinese chat demo
# (config/sft_zh.py). Same width and depth; rotary positions and a 512-token context (about 640
# characters: a chat record fits, see prepare/sft.py --max_length 513), 4 x 512 tokens a step,
# as many tokens per step as tang_char's 16 x 128. A few minutes on 2 CPU cores: a demo.
# python prepare/tokenizer.py --input ../shared/data/zh/tang_poems.txt --vocab_size 8192 --name tang8k
# python prepare/text.py --input ../shared/data/zh/tang_poems.txt --name tang_bpe --tokenizer tang8k --val_fraction 0.05
# python train.py config/tang_bpe.py
# python sample.py --out_dir=weight/tang_bpe --start="春" --max_new_tokens=80
dataset = "tang_bpe"
out_dir = "weight/tang_bpe"
device = "cpu"
block_size = 512
batch_size = 4
n_layer = 4
n_head = 4
n_embd = 128
pos_emb = "rope"
dropout = 0.0
learning_rate = 2e-3
max_iters = 400
lr_decay_iters = 0  # = max_iters
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 50
weight_decay = 0.1
eval_interval = 200
eval_iters = 20
log_interval = 50
