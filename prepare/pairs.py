"""
Preference pairs from a model's own mistakes: questions with checkable answers + a chat model ->
records whose chosen reply is the reference and whose rejected reply is one the model wrote
and the reward scored wrong. prepare/dpo.py turns them into a DPO dataset.

    python prepare/pairs.py --out_dir weight/arith --prompts data/arith/rl_train.jsonl \
        --output data/arith/pairs.jsonl [--samples 4] [--temperature 1.0] [--reward exact]
        [--per_question 1] [--max_new_tokens 48] [--seed 1337]
    python prepare/dpo.py --input data/arith/pairs.jsonl --name arith_dpo --base data/arith_base \
        --max_length 128 --val_fraction 0.1

The questions and the check are rl.py's (rewards.py): {"prompt", "reference"} lines, and
`--reward` exact | number | module:function. For each question the model's greedy reply and
`--samples` sampled ones (seeded by (seed, question, sample), decoded 64 questions at a time as
one batch) are scored; the greedy reply comes first among the wrong ones, then the sampled ones
in order, each distinct reply once and never the reference itself, `--per_question` at most. A
question the model always answers right gives no pair: the pairs are exactly where it errs.
Each record is
    {"messages": [{"role": "user", ...}], "chosen": {"role": "assistant", "content": reference},
     "rejected": {"role": "assistant", "content": wrong reply}, "prompt", "reference", "group"}
(the format prepare/sft.py and prepare/dpo.py read; the question's own keys make the file a
question file for rl.py too: the questions this model gets wrong), written atomically (an
existing --output only with --overwrite). The summary line counts the questions answered wrong
greedily and in any of the replies.
"""
import argparse
import json
import os
import sys
import time

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import load_for_inference, sample_groups, seeded, turn_text, user_prompt  # noqa: E402
from files import atomic_write, claim_file  # noqa: E402
from rewards import load_reward, read_questions  # noqa: E402
from settings import ConfigError, cli  # noqa: E402


def mine_pairs(model, tok, questions: list[dict], reward_fn, samples: int, temperature: float,
               per_question: int, max_new_tokens: int, seed: int, autocast=None,
               chunk: int = 64) -> tuple[list[dict], dict]:
    """(preference records, counts) for the questions: see the module's docstring."""
    prompts = [user_prompt(tok, q["prompt"]) for q in questions]
    greedy, sampled = [], []
    for s in range(0, len(prompts), chunk):  # a batch of chunk x (1 + samples) rows at a time
        part = prompts[s:s + chunk]
        greedy += sample_groups(model, tok, part, 1, 0.0, 0, max_new_tokens, autocast=autocast)
        if samples:
            sampled += sample_groups(model, tok, part, samples, temperature, 0, max_new_tokens,
                                     [seeded(seed, s + i, j) for i in range(len(part)) for j in range(samples)],
                                     autocast)
    records, counts = [], {"questions": len(questions), "greedy_wrong": 0, "any_wrong": 0, "pairs": 0}
    for i, q in enumerate(questions):
        replies = [turn_text(tok, r) for r in [greedy[i]] + sampled[i * samples:(i + 1) * samples]]
        wrong = [r for r in replies if float(reward_fn(q["prompt"], r, q["reference"])) < 1.0]
        counts["greedy_wrong"] += replies[0] in wrong
        counts["any_wrong"] += bool(wrong)
        distinct = [r for r in dict.fromkeys(wrong) if r.strip() != q["reference"].strip()]
        for reply in distinct[:per_question]:
            records.append({"messages": [{"role": "user", "content": q["prompt"]}],
                            "chosen": {"role": "assistant", "content": q["reference"]},
                            "rejected": {"role": "assistant", "content": reply}, **q})
    counts["pairs"] = len(records)
    return records, counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out_dir", required=True, help="the chat model: a run folder (weight/<run>) or a .pt file")
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt", "reference"} questions')
    p.add_argument("--output", required=True, help="the preference records to write (JSONL)")
    p.add_argument("--samples", type=int, default=4, help="sampled replies per question, beside the greedy one")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reward", default="exact", help="exact | number | module:function, as in rl.py")
    p.add_argument("--per_question", type=int, default=1, help="pairs per question at most")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = p.parse_args(argv)
    if args.samples < 0 or args.per_question < 1 or not args.temperature > 0:
        raise ConfigError("need --samples >= 0, --per_question >= 1 and --temperature > 0")
    claim_file(args.output, args.overwrite, inputs=(args.prompts,))
    t0 = time.time()
    reward_fn = load_reward(args.reward)
    questions = read_questions(args.prompts, "--prompts")
    model, tok, _, run = load_for_inference(args.out_dir, args.device)
    records, counts = mine_pairs(model, tok, questions, reward_fn, args.samples, args.temperature,
                                 args.per_question, args.max_new_tokens, args.seed, run.autocast)
    if not records:
        raise ConfigError(f"{args.out_dir} answered all {len(questions)} questions of {args.prompts} right: no pairs")
    with atomic_write(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(f"{args.output}: {counts['pairs']} pairs from {counts['questions']} questions; wrong greedily "
          f"{counts['greedy_wrong']}, wrong in greedy or {args.samples} samples {counts['any_wrong']} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    cli(main)
