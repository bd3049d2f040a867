# DPO of the Chinese chat demo (config/sft_zh.py) on the same 300 preference records: the chosen
# and rejected replies of each prompt as pairs (prepare/dpo.py), the reference a frozen copy of
# weight/sft_zh. Prepare the SFT and DPO data with the same --val_fraction (and seed): a record's
# split is drawn by one seeded shuffle, so the held-out pairs are then held out from SFT too;
# SFT's default 0.05 would leave 3 val pairs, and a larger DPO fraction alone would score pairs
# whose chosen replies SFT trained on.
#   python prepare/sft.py --input ../shared/data/sft/dpo_zh_demo.json --name sft_zh \
#       --base data/tang_bpe --max_length 513 --val_fraction 0.2
#   python sft.py config/sft_zh.py                                     # -> weight/sft_zh
#   python prepare/dpo.py --input ../shared/data/sft/dpo_zh_demo.json --name dpo_zh \
#       --base data/tang_bpe --max_length 513 --val_fraction 0.2      # 66 train, 17 val pairs
#   python dpo.py config/dpo_zh.py                                     # -> weight/dpo_zh
# Each evaluation logs TRL's rewards/* and logps/accuracies (how often the model itself finds
# the chosen reply likelier) on train and val pairs; iter 0 is the SFT model.
base = "weight/sft_zh"
dataset = "dpo_zh"
out_dir = "weight/dpo_zh"
device = "cpu"
batch_size = 4  # pairs: 8 sequences of up to 513 tokens
epochs = 3
beta = 0.1
learning_rate = 3e-4  # TRL's 1e-6 is for billions of parameters; a 4 x 128 model needs far more
min_lr = learning_rate / 10
warmup_iters = 5
weight_decay = 0.0
dropout = 0.0
eval_interval = 16  # an epoch
eval_iters = 17  # x 4 pairs: every train pair (66) and every val pair (17)
log_interval = 4
sample_prompts = ""
