# Arithmetic chat demo, step 2: SFT of weight/arith_base on the chats of data/arith; then
#   python eval.py --out_dir=weight/arith_sft --generate    # exact match on 200 held-out questions
base = "weight/arith_base"
dataset = "arith"
out_dir = "weight/arith_sft"
device = "auto"
batch_size = 32
epochs = 4  # exact match on the held-out questions: 1 epoch 75.5%, 4: 86.5%, 8: 91.5%
optimizer = "muon"
muon_lr = 0.01
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 250
eval_iters = 7  # the 200 val chats
log_interval = 50
