# DPO of the arithmetic chat demo (config/arith.py) on its own mistakes: prepare/pairs.py asks
# the SFT model the RL questions (trained wordings, no val operands), and each question it
# answered wrong (greedily, or in one of 4 samples) becomes a pair: the reference chosen, its
# wrong reply rejected. The reference model is a frozen copy of weight/arith.
#   python prepare/pairs.py --out_dir weight/arith --prompts data/arith/rl_train.jsonl \
#       --output data/arith/pairs.jsonl
#   python prepare/dpo.py --input data/arith/pairs.jsonl --name arith_dpo --base data/arith_base \
#       --max_length 128 --val_fraction 0.1
#   python dpo.py config/dpo_arith.py                                  # -> weight/arith_dpo
#   python eval.py --out_dir=weight/arith_dpo --generate --max_new_tokens=48 --prompts=data/arith/val_operands.jsonl
# Each evaluation logs TRL's rewards/* and logps/accuracies on train and held-out pairs; iter 0
# is the SFT model.
base = "weight/arith"
dataset = "arith_dpo"
out_dir = "weight/arith_dpo"
device = "cpu"
batch_size = 16  # pairs: 32 chats of at most 128 characters
epochs = 2
beta = 0.1
learning_rate = 1e-4  # TRL's 1e-6 is for billions of parameters
min_lr = 1e-5
warmup_iters = 5
weight_decay = 0.0
dropout = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
sample_prompts = ""
