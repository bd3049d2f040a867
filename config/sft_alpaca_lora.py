# LoRA SFT of the same base and data as config/sft_alpaca.py: the base frozen, rank-8 adapters on
# attention and the MLP (q, k, v, o, mlp_in, mlp_out) plus the new chat tokens' rows train.
# ckpt.pt holds only those and a reference (path + sha256) to the base; sample.py reads it as is,
# export.py --merge folds the adapters in. README "Fine-tune with LoRA" has the figures.
#   python sft.py config/sft_alpaca_lora.py                     # -> weight/sft_alpaca_lora
#   python sample.py --out_dir=weight/sft_alpaca_lora --chat
#   python export.py --out_dir=weight/sft_alpaca_lora --merge --dest=weight/sft_alpaca_merged
base = "weight/shakespeare_gpt2_cpu"
dataset = "alpaca"
out_dir = "weight/sft_alpaca_lora"
device = "auto"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "q,k,v,o,mlp_in,mlp_out"
batch_size = 8
epochs = 3
learning_rate = 3e-3  # adapters want a larger step than full SFT's 1e-3
min_lr = learning_rate / 10
warmup_iters = 10
weight_decay = 0.0
dropout = 0.0
prompt_loss_weight = 0.0
eval_interval = 50
eval_iters = 5
log_interval = 5
sample_prompts = "Give three tips for staying healthy.|What is the capital of France?"
sample_max_new_tokens = 48
