#!/usr/bin/env bash
# The GPU recipe: GPT-2 small (124M) pretrained on a large text corpus, SFT on an instruction
# set, the MNIST classifier, then serve.py with all three. Prints where the time went.
#
#   CORPUS=/data/fineweb_txt SFT_DATA=alpaca_data.json MNIST=/data/mnist bash runs/gpu_recipe.sh
#   NGPU=8 ...                      # torchrun on 8 GPUs (default: every GPU nvidia-smi lists)
#   MAX_ITERS=200 ...               # a short pretrain, to check the plumbing first
#
# CORPUS: a folder (or file) of .txt / .jsonl {"text": ...}; SFT_DATA: Alpaca, ShareGPT, OpenAI
# or minimind records (prepare/sft.py reads them all); MNIST: the four idx files.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CORPUS:?set CORPUS to a folder of .txt or .jsonl text (e.g. FineWeb or OpenWebText)}"
: "${SFT_DATA:?set SFT_DATA to an instruction file (e.g. alpaca_data.json)}"
: "${MNIST:?set MNIST to the folder with the four MNIST idx files}"
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NGPU" -ge 1 ] || { echo "error: no GPU found (nvidia-smi lists none); use runs/cpu_demo.sh" >&2; exit 1; }
PRE_ITERS=()
[ -n "${MAX_ITERS:-}" ] && PRE_ITERS=(--max_iters="$MAX_ITERS" --lr_decay_iters="$MAX_ITERS" --eval_interval="$MAX_ITERS")
launch=(python)
[ "$NGPU" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node="$NGPU")

. runs/steps.sh  # step and report (the working folder is the repo root from here on)

step "prepare corpus"   python prepare/text.py --input "$CORPUS" --name owt
step "pretrain 124M"    "${launch[@]}" train.py config/gpt2_124m.py "${PRE_ITERS[@]}"
step "prepare SFT"      python prepare/sft.py --input "$SFT_DATA" --name sft_gpu --base data/owt --max_length 1025
# config/sft_alpaca.py's keys, with a learning rate and batch for a real 124M base (see its notes)
step "SFT"              "${launch[@]}" sft.py config/sft_alpaca.py --base=weight/gpt2_124m --dataset=sft_gpu \
                            --out_dir=weight/sft_gpt2_124m --learning_rate=5e-5 --min_lr=5e-6 \
                            --batch_size=32 --epochs=2 --device=cuda --eval_iters=20
step "prepare MNIST"    python prepare/tiny_cls.py --mnist_dir "$MNIST"
step "train classifier" python train.py config/tiny_cls_mnist.py --device=cuda

report

if [ "${SERVE:-1}" = 1 ]; then
  exec python serve.py --out_dir=weight/sft_gpt2_124m --out_dir=weight/gpt2_124m \
      --out_dir=weight/tiny_cls_mnist --port="${PORT:-8000}"
fi
