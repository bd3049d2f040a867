# Full SFT of a GPT-2-BPE danlu model on Alpaca-format instructions, into a chat model.
#
# The whole pipeline, from nothing, on a 2-core CPU (pretrain ~5 min, SFT ~2.5 min; README):
#   python prepare/text.py --input ../shared/data/tinyshakespeare.txt --name shakespeare_gpt2
#   python train.py config/pretrain_gpt2_small_cpu.py          # -> weight/shakespeare_gpt2_cpu
#   python prepare/sft.py --input ../shared/data/sft/alpaca_en_demo.json --name alpaca \
#       --base data/shakespeare_gpt2 --max_length 257           # <= the model's block_size + 1
#   python sft.py config/sft_alpaca.py                         # -> weight/sft_alpaca
#   python sample.py --out_dir=weight/sft_alpaca --chat
#
# Real instruction sets (prepare/sft.py reads all of these formats as they come):
#   - Stanford Alpaca, 52k records: alpaca_data.json from github.com/tatsu-lab/stanford_alpaca;
#     LLaMA-Factory's data/ folder ships it and others (alpaca_en_demo.json is its 1k sample).
#   - minimind's sft_mini_512.jsonl (Chinese + English, {"conversations": [...]} records) from
#     the jingyaogong/minimind-dataset repository on Hugging Face / ModelScope.
#   - any OpenAI-style {"messages": [...]} or ShareGPT {"conversations": [{"from", "value"}]} file.
# For a real base (a 124M-size danlu pretrain, block_size 1024): prepare with --max_length 1025,
# then learning_rate 3e-5..1e-4, batch_size 32 (or gradient_accumulation_steps), epochs 2-3.
base = "weight/shakespeare_gpt2_cpu"  # the pretrained run folder
dataset = "alpaca"  # data/alpaca from prepare/sft.py, on the base's tokenizer
out_dir = "weight/sft_alpaca"
device = "auto"
batch_size = 8
epochs = 3
# Large for SFT, but right for the tiny, briefly pretrained CPU base above (a 124M-size base
# wants 3e-5..1e-4): val loss on answers 9.11 -> 6.32 over 3 epochs.
learning_rate = 1e-3
min_lr = learning_rate / 10
warmup_iters = 10
weight_decay = 0.0
dropout = 0.0
prompt_loss_weight = 0.0  # answers (and their <|end|>) only: the val loss is a loss on answers
eval_interval = 50
eval_iters = 5  # the val split has 35 conversations: 5 batches of 8 covers all of it
log_interval = 5
sample_prompts = "Give three tips for staying healthy.|What is the capital of France?"
sample_max_new_tokens = 48
