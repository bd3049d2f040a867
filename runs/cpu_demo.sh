#!/usr/bin/env bash
# The CPU demo, from nothing to a served model: a digit classifier (the main job) and a chat
# model (prepare -> pretrain -> SFT), then serve.py with both and the chat model's base beside
# them, so the page can compare base and chat side by side. Prints where the time went.
#
#   bash runs/cpu_demo.sh              # ~9 min on an idle 2-core CPU, then serves on 127.0.0.1:8000
#   QUICK=1 bash runs/cpu_demo.sh      # a few iterations of each step: checks the plumbing (~2 min)
#   SERVE=0 bash runs/cpu_demo.sh      # train only
#   ARITH=1 bash runs/cpu_demo.sh      # and the arithmetic chat model that answers right (+8 min), served too
#
# Needs Tiny Shakespeare and LLaMA-Factory's alpaca_en_demo.json under $DATA (default
# ../shared/data) and, offline, tiktoken's GPT-2 files under $TIKTOKEN_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
PORT=${PORT:-8000}
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d ../shared/tiktoken ]; then
  export TIKTOKEN_CACHE_DIR="$(cd ../shared/tiktoken && pwd)"
fi
for f in "$DATA/tinyshakespeare.txt" "$DATA/sft/alpaca_en_demo.json"; do
  [ -f "$f" ] || { echo "error: $f is missing; set DATA=/folder/with/tinyshakespeare.txt and sft/alpaca_en_demo.json" >&2; exit 1; }
done
CLS_ITERS=() PRE_ITERS=() SFT_ITERS=() ARITH_ITERS=()
if [ "${QUICK:-0}" = 1 ]; then
  CLS_ITERS=(--max_iters=100 --eval_interval=50) PRE_ITERS=(--max_iters=30 --eval_interval=30)
  SFT_ITERS=(--max_iters=20 --eval_interval=20) ARITH_ITERS=(--max_iters=30 --eval_interval=30)
fi

. runs/steps.sh  # step and report (the working folder is the repo root from here on)

# The demo's runs get names of their own (weight/demo_*), a fresh set each time: it never resumes
# or replaces the runs a user trained with the same configs (weight/tiny_cls, ...).
RUN=weight/demo_$(date +%Y%m%d_%H%M%S)
step "prepare digits"   python prepare/tiny_cls.py
step "train classifier" python train.py config/tiny_cls.py --out_dir="${RUN}_tiny_cls" "${CLS_ITERS[@]}"
step "prepare text"     python prepare/text.py --input "$DATA/tinyshakespeare.txt" --name shakespeare_gpt2
step "pretrain"         python train.py config/pretrain_gpt2_small_cpu.py --out_dir="${RUN}_base" "${PRE_ITERS[@]}"
step "prepare SFT"      python prepare/sft.py --input "$DATA/sft/alpaca_en_demo.json" --name alpaca \
                            --base data/shakespeare_gpt2 --max_length 257
step "SFT"              python sft.py config/sft_alpaca.py --base="${RUN}_base" --out_dir="${RUN}_sft" "${SFT_ITERS[@]}"
SERVED=(--out_dir="${RUN}_sft" --out_dir="${RUN}_base" --out_dir="${RUN}_tiny_cls")
if [ "${ARITH:-0}" = 1 ]; then
  step "prepare arithmetic" python prepare/arith.py
  step "train arithmetic"   python train.py config/arith.py --out_dir="${RUN}_arith" "${ARITH_ITERS[@]}"
  step "exact match"        python eval.py --out_dir="${RUN}_arith" --generate
  SERVED=(--out_dir="${RUN}_arith" "${SERVED[@]}")
fi

report

if [ "${SERVE:-1}" = 1 ]; then
  echo
  echo "open http://127.0.0.1:$PORT/ (Ctrl-C stops the server)"
  exec python serve.py "${SERVED[@]}" --port="$PORT"
fi
