# A tiny char-level SFT run, the one tests/test_sft.py and tests/test_chat.py make: they write a
# small pretrain text and a synthetic chat set (greetings, "add 2 3" -> "2+3=5.") into data/,
# pretrain a 2-layer char model into weight/char_tiny, then run
#   python sft.py config/sft_char_tiny.py
# About ten seconds on a CPU. For a real instruction set see config/sft_alpaca.py.
base = "weight/char_tiny"
dataset = "sft_char_tiny"
out_dir = "weight/sft_char_tiny"
device = "cpu"
batch_size = 16
learning_rate = 3e-3  # a model this small, trained this briefly, wants a large step
min_lr = 3e-4
warmup_iters = 10
epochs = 6
eval_interval = 50
eval_iters = 4
log_interval = 10
sample_prompts = "hello|add 2 3"
sample_max_new_tokens = 24
