# GPT-2 small (124M) on a large GPT-2-BPE text dataset, for GPUs.
# Data: python prepare/text.py --input /path/to/openwebtext_or_fineweb/ --name owt
# One GPU:    python train.py config/gpt2_124m.py
# 8 GPUs:     torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# 2 nodes:    torchrun --nnodes=2 --node_rank=0|1 --nproc_per_node=8 \
#                 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py config/gpt2_124m.py
# ~0.5M tokens per optimizer step: 12 sequences x 1024 tokens x 40 accumulation steps
# (gradient_accumulation_steps is global: 8 GPUs each run 5 micro-steps).
dataset = "owt"
out_dir = "weight/gpt2_124m"
wandb_project = "danlu"
wandb_run_name = "gpt2-124m"

block_size = 1024
batch_size = 12
gradient_accumulation_steps = 40
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 2000

eval_interval = 1000
eval_iters = 200
log_interval = 10
compile = True
