# RL of the arithmetic chat demo (config/arith.py) on the questions it gets wrong: prepare/pairs.py
# asks the SFT model the 5,000 questions of data/arith/rl_train.jsonl (trained wordings, no val or
# test operands) greedily and 4 times sampled, and keeps those answered wrong at least once (74,
# 1.5%, for the shipped model); an answer earns 1 when it is exactly the reference (the restated
# problem, its work and its result).
#   python prepare/arith.py && python train.py config/arith.py       # -> weight/arith
#   python prepare/pairs.py --out_dir weight/arith --prompts data/arith/rl_train.jsonl \
#       --output data/arith/pairs.jsonl                               # the questions it gets wrong
#   python rl.py config/rl_arith.py                                   # -> weight/rl_arith
#   python eval.py --out_dir=weight/rl_arith --generate --prompts=data/arith/test_operands.jsonl --max_examples=1000
# On all of rl_train.jsonl (--prompts=data/arith/rl_train.jsonl) most groups of 8 replies are all
# right and teach nothing (docs/finetuning.md, RL). Each evaluation logs greedy pass@1 (overall,
# en, zh) on both val files: iter 0 is the SFT model.
base = "weight/arith"
dataset = "arith"  # the SFT data: its tokenizer, and val_loss (the loss of the right answers)
prompts = "data/arith/pairs.jsonl"
val_prompts = "data/arith/val_operands.jsonl|data/arith/val_wordings.jsonl"
out_dir = "weight/rl_arith"
device = "cpu"
reward = "exact"
group_size = 8
batch_size = 16  # questions: 128 replies a step
temperature = 1.0
max_new_tokens = 48  # the longest answer is 40 characters
kl_coef = 0.0
learning_rate = 1e-4  # Adam on a 0.8M model: 3e-4 lost 2 points of the val questions (docs/finetuning.md)
min_lr = 1e-5
weight_decay = 0.0
max_iters = 150
# Evaluate at the start and the end only: best.pt follows val_loss (the loss of the SFT data's
# right answers), which RL does not lower, so a mid-run evaluation would keep an early best.pt;
# evaluations do not change the training (its sampling is seeded apart), so the weights are those
# of any eval_interval. --eval_interval=50 shows the curve.
eval_interval = 150
eval_iters = 7  # x 32 SFT val chats: the loss of the right answers
log_interval = 10
pass_k = 4
