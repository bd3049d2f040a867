# A small GPT-2-BPE model on Tiny Shakespeare, sized for a few minutes on 2 CPU cores: the base
# that config/sft_alpaca.py fine-tunes into a chat model. The 50,257-token GPT-2 vocabulary
# dominates the cost (the logits are 50k floats per token), so depth is nearly free next to
# width: 8 layers x 128, with the speedrun's rotary positions, RMSNorm, QK-norm, ReLU^2 and Muon
# (README, "Speed"). Val loss 4.62 after 300 iterations (the earlier 4 x 128 GPT-2 layout: 5.53).
# python prepare/text.py --input ../shared/data/tinyshakespeare.txt --name shakespeare_gpt2
# python train.py config/pretrain_gpt2_small_cpu.py
dataset = "shakespeare_gpt2"
out_dir = "weight/shakespeare_gpt2_cpu"
device = "cpu"
block_size = 256  # Alpaca prompts + answers: 720 of 999 fit 257 tokens (prepare/sft.py --max_length 257)
batch_size = 8
n_layer = 8
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_emb = "rope"
norm = "rmsnorm"
qk_norm = True
mlp = "relu2"
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3  # AdamW, for the embedding and the norms' gains
max_iters = 300
lr_schedule = "wsd"
cooldown_frac = 0.5
warmup_iters = 10
min_lr = 1e-4
weight_decay = 0.1
beta2 = 0.99
eval_interval = 100
eval_iters = 10
log_interval = 20
