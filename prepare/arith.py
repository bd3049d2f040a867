"""
A chat skill a small model learns on a CPU in minutes and eval.py can check exactly: arithmetic
asked in varied phrasings, in English and Chinese.

    python prepare/arith.py [--name arith] [--n_train 40000] [--n_val 200] [--seed 1337]
    python train.py config/arith.py                         # a chat model from scratch, ~7.5 min on 2 cores
    python eval.py --out_dir=weight/arith --generate        # exact match on the held-out questions

Writes data/<name> (the chats) and data/<name>_base (the same problems as plain sentences, one
per line: the char vocabulary the chats are written in, and a corpus for whoever wants to
pretrain first). Questions are sums and differences of numbers below 1000 and products of a
number below 100 with one digit; a product's answer shows its work (87 × 7 = 560 + 49 = 609).
The val questions are drawn first; no train question has the same operands and operation (in
either order), so every val question is one the model never saw.
"""
import argparse
import json
import os
import random
import sys
import tempfile

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from settings import cli  # noqa: E402
from prepare.sft import build_sft_dataset  # noqa: E402
from prepare.text import main as prepare_text  # noqa: E402

# One question template per phrasing; {a} {b} are the operands. The answer restates the sum.
QUESTIONS = {
    "en": {
        "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a}+{b}.",
              "How much is {a} plus {b}?", "{a} + {b} = ?", "What do you get if you add {b} to {a}?"],
        "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a}-{b}.",
              "How much is {a} minus {b}?", "{a} - {b} = ?", "Take {b} away from {a}."],
        "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a}*{b}.",
              "How much is {a} times {b}?", "{a} x {b} = ?", "What is the product of {a} and {b}?"],
    },
    "zh": {
        "+": ["{a}加{b}等于多少？", "计算{a}+{b}。", "{a}和{b}的和是多少？", "{a} + {b} = ？", "请算一下{a}加{b}。"],
        "-": ["{a}减{b}等于多少？", "计算{a}-{b}。", "{a}与{b}的差是多少？", "{a} - {b} = ？", "请算一下{a}减{b}。"],
        "*": ["{a}乘以{b}等于多少？", "计算{a}×{b}。", "{a}和{b}的积是多少？", "{a} × {b} = ？", "请算一下{a}乘{b}。"],
    },
}
ANSWERS = {"en": "{a} {op} {b} = {c}.", "zh": "{a}{op}{b}等于{c}。"}
# A product shows its work, tens then ones: 87 × 7 = 560 + 49 = 609. Each partial product is a
# table fact (8 × 7, then a zero), and the sum is one the model already does; written at once,
# the hundreds digit of 609 needs the whole product before its first character.
WORKED = {"en": "{a} × {b} = {t} + {u} = {c}.", "zh": "{a}乘{b}等于{t}加{u}，等于{c}。"}
OP_WORDS = {"en": {"+": "+", "-": "-", "*": "×"}, "zh": {"+": "加", "-": "减", "*": "乘"}}


def problem(rng: random.Random) -> tuple[str, int, int]:
    op = rng.choice("+-*")
    if op == "*":
        return op, rng.randrange(100), rng.randrange(10)
    a, b = rng.randrange(1000), rng.randrange(1000)
    return (op, max(a, b), min(a, b)) if op == "-" else (op, a, b)  # no negative answers


def key(op: str, a: int, b: int) -> tuple:
    """The same question whichever operand comes first (for + and *)."""
    return (op, a, b) if op == "-" else (op, min(a, b), max(a, b))


def conversation(rng: random.Random, op: str, a: int, b: int) -> dict:
    lang = rng.choice(sorted(QUESTIONS))
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = rng.choice(QUESTIONS[lang][op]).format(a=a, b=b)
    if op == "*" and a >= 10 and b >= 2:
        answer = WORKED[lang].format(a=a, b=b, t=a // 10 * 10 * b, u=a % 10 * b, c=c)
    else:
        answer = ANSWERS[lang].format(a=a, b=b, c=c, op=OP_WORDS[lang][op])
    return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}


def make_splits(n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    val, held_out = [], set()
    while len(val) < n_val:
        op, a, b = problem(rng)
        if key(op, a, b) not in held_out:
            held_out.add(key(op, a, b))
            val.append(conversation(rng, op, a, b))
    train = []
    while len(train) < n_train:
        op, a, b = problem(rng)
        if key(op, a, b) not in held_out:
            train.append(conversation(rng, op, a, b))
    return train, val


def plain_text(records: list[dict]) -> str:
    """The problems as plain sentences (question, then answer), one per line: the base model
    learns the characters and the arithmetic; SFT then teaches it to answer in turns."""
    return "\n".join(" ".join(t["content"] for t in r["conversations"]) for r in records) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--name", default="arith", help="writes data/<name> and data/<name>_base")
    p.add_argument("--n_train", type=int, default=40000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    if args.n_train < 1 or args.n_val < 1:
        p.error("--n_train and --n_val must be at least 1")
    train, val = make_splits(args.n_train, args.n_val, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, records in (("train", train), ("val", val)):
            files[split] = os.path.join(tmp, f"{split}.jsonl")
            with open(files[split], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(plain_text(train))
        base = f"{args.name}_base"
        prepare_text(["--input", corpus, "--name", base, "--tokenizer", "char", "--val_fraction", "0.02",
                      "--chunk_size", "65536"])
        summary = build_sft_dataset([files["train"]], os.path.join("data", base), os.path.join("data", args.name),
                                    max_length=128, val_inputs=[files["val"]], seed=args.seed)
    print(f"data/{base}: plain problems for pretraining; data/{args.name}: {len(train)} train chats, "
          f"{len(val)} held-out val chats")
    return summary


if __name__ == "__main__":
    cli(main)
