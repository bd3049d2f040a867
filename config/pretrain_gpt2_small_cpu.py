# A small GPT-2-BPE model on Tiny Shakespeare, sized for a few minutes on 2 CPU cores: the base
# that config/sft_alpaca.py fine-tunes into a chat model. The 50,257-token GPT-2 vocabulary
# dominates the cost here (the logits alone are 50k floats per token), so the body is tiny and
# the context short. It learns Shakespeare-like English (val loss ~5.5), no more.
# python prepare/text.py --input ../shared/data/tinyshakespeare.txt --name shakespeare_gpt2
# python train.py config/pretrain_gpt2_small_cpu.py
dataset = "shakespeare_gpt2"
out_dir = "weight/shakespeare_gpt2_cpu"
device = "cpu"
block_size = 128  # Alpaca prompts + answers: ~half fit in 129 tokens (prepare/sft.py --max_length 129)
batch_size = 8
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 1e-3
max_iters = 300
lr_decay_iters = max_iters
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.1
beta2 = 0.99
eval_interval = 100
eval_iters = 10
log_interval = 10
