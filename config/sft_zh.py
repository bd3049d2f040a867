# The Chinese chat demo: SFT of the Tang-poem BPE model (config/tang_bpe.py) on 300 Chinese
# preference records, their chosen replies as the targets (prepare/sft.py). The whole pipeline,
# offline, a few minutes each on 2 CPU cores (README, "Chinese end to end"):
#   python prepare/tokenizer.py --input ../shared/data/zh/tang_poems.txt --vocab_size 8192 --name tang8k
#   python prepare/text.py --input ../shared/data/zh/tang_poems.txt --name tang_bpe --tokenizer tang8k --val_fraction 0.05
#   python train.py config/tang_bpe.py                                 # -> weight/tang_bpe
#   python prepare/sft.py --input ../shared/data/sft/dpo_zh_demo.json --name sft_zh \
#       --base data/tang_bpe --max_length 513                          # <= the base's block_size + 1
#   python sft.py config/sft_zh.py                                     # -> weight/sft_zh
#   python sample.py --out_dir=weight/sft_zh --chat
# A 4 x 128 model (0.8M parameters besides the embedding) that has read Tang poems learns the
# turn format and when to stop, not to answer: a demo of every step working in Chinese. For
# real Chinese chat, start from a real base and data (minimind's pretrain_hq.jsonl and
# sft_mini_512.jsonl; its dpo.jsonl for preference records).
base = "weight/tang_bpe"
dataset = "sft_zh"
out_dir = "weight/sft_zh"
device = "cpu"
batch_size = 8
epochs = 15  # 99 train records: 180 iterations
learning_rate = 1e-3  # large for SFT, right for a tiny briefly pretrained base (as sft_alpaca)
min_lr = learning_rate / 10
warmup_iters = 5
weight_decay = 0.0
dropout = 0.0
prompt_loss_weight = 0.0  # the chosen replies (and their <|end|>) only
eval_interval = 60
eval_iters = 1  # the val split is a handful of records: one batch of 8 covers it
log_interval = 5
sample_prompts = "你好，请介绍一下你自己。|写一首关于春天的诗。"
sample_max_new_tokens = 48
