"""
A chat skill a small model learns on a CPU in minutes and eval.py can check exactly: arithmetic
asked the many ways people ask it, in English and Chinese.

    python prepare/arith.py [--name arith] [--n_train 120000] [--n_val 200] [--seed 1337]
    python train.py config/arith.py                        # a chat model from scratch
    python eval.py --out_dir=weight/arith --generate --prompts=data/arith/val_wordings.jsonl

Questions are sums and differences of numbers below 1000 and products of a number below 100
with one digit; a product's answer shows its work (87 × 7 = 560 + 49 = 609), and so do a
difference (503 - 287 = 303 - 87 = 223 - 7 = 216) and a sum (441 + 151 = 541 + 51 = 591 + 1 =
592), a column at a time. They come from a
grammar, not a list: a courtesy (or none), then a frame (the sentence around the operation:
"what is E?", "E = ?", "E, please.", "Can you E?") around an expression of the operation (the
verb first or last, both operand orders where the operation allows, symbols or one of several
words), each operand in digits or in words (three hundred and five, 三百零五). About 10^4 trained
wordings, times four number styles, times a million operand pairs: no model of this size can
memorise it. The answer restates the problem in one canonical form, so reading shows.

Whole productions are held out (HELD_OUT: expressions and frames no training question uses,
built from words that training does use), so the figure measures reading, not recall:
  data/<name>/val.bin            trained wordings, new operands (eval.py --generate scores it)
  data/<name>/val_operands.jsonl the same questions as {"prompt", "reference", "group": en|zh}
  data/<name>/val_wordings.jsonl held-out wordings, new operands (eval.py --prompts=...)
  data/<name>/rl_train.jsonl     trained wordings, other new operands: questions for rl.py
  data/<name>/test_operands.jsonl, test_wordings.jsonl
                                 the two val kinds again, 1,000 each (--n_test), operands of no
                                 other split: figures to 0.1%, where 200 questions move by 0.5%
Training's problems are drawn where models miss (TRAIN_OPS, training_problem); val, test and
rl_train are uniform.
No operand pair (either order) of a val question is in train or rl_train. data/<name>_base holds
the problems as plain text, one per line: the char vocabulary the chats are written in.
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

MAX_CHARS = 120  # a chat longer than this is redrawn: the model's window is 128 tokens (chars)

# ----------------------------------------------------------------------------- numbers as words

EN_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
          "sixteen seventeen eighteen nineteen".split()
EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ZH_DIGITS = "零一二三四五六七八九"


def en_words(n: int, rng: random.Random) -> str:
    """0..999 in English words: 305 -> three hundred and five (or three hundred five)."""
    if n < 20:
        return EN_ONES[n]
    if n < 100:
        return EN_TENS[n // 10] + ("" if n % 10 == 0 else "-" + EN_ONES[n % 10])
    head = EN_ONES[n // 100] + " hundred"
    if n % 100 == 0:
        return head
    return head + rng.choice([" and ", " "]) + en_words(n % 100, rng)


def zh_words(n: int, rng: random.Random) -> str:
    """0..999 in Chinese numerals: 305 -> 三百零五, 12 -> 十二, 110 -> 一百一十, 200 -> 两百 or 二百."""
    if n < 10:
        return ZH_DIGITS[n]
    if n < 100:
        tens = "" if n < 20 else ZH_DIGITS[n // 10]
        return tens + "十" + ("" if n % 10 == 0 else ZH_DIGITS[n % 10])
    h, rest = divmod(n, 100)
    head = (rng.choice(["两", "二"]) if h == 2 else ZH_DIGITS[h]) + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + ZH_DIGITS[rest]
    return head + ZH_DIGITS[rest // 10] + "十" + ("" if rest % 10 == 0 else ZH_DIGITS[rest % 10])


def number(n: int, lang: str, rng: random.Random) -> str:
    """An operand as people type it: mostly digits, a quarter of the time in words."""
    if rng.random() < 0.75:
        return str(n)
    return en_words(n, rng) if lang == "en" else zh_words(n, rng)


# ----------------------------------------------------------------------------- the grammar
# An expression says the operation: {a} is the first operand of the canonical answer (the
# minuend; for + and × either may come first, see conversation), {b} the second, {op} one of
# OP_WORDS. A frame puts an expression E in a sentence. A question is courtesy + frame(E).

OP_WORDS = {
    "en": {"+": ["plus", "+"], "-": ["minus", "-", "−", "less"],
           "*": ["times", "×", "*", "x", "multiplied by"]},
    "zh": {"+": ["加", "加上", "+"], "-": ["减", "减去", "-"], "*": ["乘", "乘以", "×", "*"]},
}
EXPRESSIONS = {
    "en": {
        "+": ["{a} {op} {b}", "the sum of {a} and {b}", "!add {a} and {b}", "!add {b} to {a}",
              "{a} and {b} added together", "{a} added to {b}", "{b} more than {a}", "the total of {a} and {b}", "{a} increased by {b}",
              "{a} and {b} together", "!sum {a} and {b}", "{a} with {b} added"],
        "-": ["{a} {op} {b}", "!subtract {b} from {a}", "{a} take away {b}", "!take {b} away from {a}",
              "the difference between {a} and {b}", "{b} subtracted from {a}", "{a} decreased by {b}",
              "!from {a} take {b}", "{b} less than {a}", "{a} with {b} taken away", "{a} reduced by {b}",
              "!take {b} from {a}", "{a} with {b} subtracted"],
        "*": ["{a} {op} {b}", "the product of {a} and {b}", "!multiply {a} by {b}", "!multiply {a} and {b}",
              "{a} multiplied by {b}", "{b} lots of {a}", "{a} groups of {b}", "{a} times {b}",
              "{b} multiplied by {a}", "{b} times {a}", "!multiply {b} by {a}", "{a} sets of {b}"],
    },
    "zh": {
        "+": ["{a}{op}{b}", "{a}和{b}的和", "{a}与{b}相加", "{a}和{b}相加", "!把{a}和{b}加起来", "{a}加{b}",
              "{b}加到{a}上", "{a}再加{b}", "比{a}多{b}", "{a}跟{b}的和", "{a}和{b}加在一起",
              "{a}与{b}之和", "!给{a}加上{b}"],
        "-": ["{a}{op}{b}", "{a}和{b}的差", "!从{a}里减去{b}", "{a}减掉{b}", "{a}与{b}之差",
              "!用{a}减去{b}", "{a}去掉{b}", "比{a}少{b}", "!从{a}中拿走{b}", "{a}少了{b}",
              "{a}扣掉{b}", "{a}与{b}的差"],
        "*": ["{a}{op}{b}", "{a}和{b}的积", "{a}与{b}相乘", "{a}的{b}倍", "{b}个{a}", "!把{a}和{b}乘起来",
              "{a}乘{b}", "{b}乘以{a}", "{a}与{b}之积", "{b}倍的{a}", "{a}跟{b}的积",
              "{b}和{a}相乘"],
    },
}
FRAMES = {
    "en": ["What is {E}?", "what's {E}?", "How much is {E}?", "{E} = ?", "{E}=?", "Compute {E}.",
           "Calculate {E}", "Work out {E}.", "{E}?", "Tell me {E}.", "What do you get for {E}?", "Find {E}.", "Solve: {E}",
           "{E}, please.", "I need {E}.", "Quick: {E}?", "Can you work out {E}?", "What's the answer to {E}?",
           "Give me {E}.", "{E} is what?", "Do {E}.", "Evaluate {E}."],
    "zh": ["{E}等于多少？", "计算{E}。", "{E}是多少？", "{E} = ？", "{E}=?", "请算一下{E}。", "{E}等于几？",
           "算算{E}", "{E}？", "求{E}。", "{E}得多少？", "帮我算{E}。", "{E}的结果是多少？", "告诉我{E}。",
           "{E}是几？", "问一下，{E}等于多少", "你能算出{E}吗？", "{E}，结果呢？", "请计算{E}", "{E}等于？",
           "算一下{E}吧。", "{E}得几？"],
}
# Expressions marked "!" are requests ("subtract 5 from 9"): they take these frames instead.
REQUEST_FRAMES = {
    "en": ["{E}.", "{E}", "{E}, please.", "Please {E}.", "Can you {E}?", "Could you {E}?", "{E} for me.",
           "Now {E}.", "{E} and tell me the result.", "Try to {E}."],
    "zh": ["请{E}。", "{E}。", "帮我{E}。", "{E}吧", "你能{E}吗？", "{E}，等于多少？", "麻烦{E}。",
           "{E}，是多少？", "试着{E}。", "现在{E}。"],
}
COURTESY = {"en": ["", "", "", "Please: ", "Hi! ", "Hey, ", "Excuse me, ", "Quick question: ",
                   "Could you help? "],
            "zh": ["", "", "", "请问", "你好，", "麻烦你，", "老师，", "请帮忙：", "问个问题："]}
# Held out from training: whole expressions and frames (the sentences around them). Every word
# in them also occurs in a trained production WITH THE SAME MEANING, so a model that reads can
# answer them. (Until issue 25's third try "比{a}多{b}" was held out: 多 ("more") occurred in
# training only inside 多少 ("how much"), so that item tested a meaning training never taught; 9
# of the 29 Chinese held-out misses were it read as a difference. It is trained now, beside its
# trained twin 比{a}少{b}, and "{a}和{b}相加" (和 "and" + 相加 "add up", both trained) is held out.)
HELD_OUT = {
    "en": {"+": ["{a} added to {b}", "{a} and {b} together", "{a} with {b} added"],
           "-": ["{b} subtracted from {a}", "!from {a} take {b}", "{a} take away {b}"],
           "*": ["{b} multiplied by {a}", "{b} times {a}", "!multiply {b} by {a}"],
           "frames": ["Tell me {E}.", "Can you work out {E}?", "Quick: {E}?", "{E} is what?", "Could you {E}?"]},
    "zh": {"+": ["{a}和{b}相加", "{a}与{b}之和", "{a}跟{b}的和"],
           "-": ["{a}减掉{b}", "{a}去掉{b}", "{a}与{b}的差"],
           "*": ["{b}乘以{a}", "{b}倍的{a}", "{a}与{b}之积"],
           "frames": ["{E}得多少？", "帮我算{E}。", "{E}的结果是多少？", "算一下{E}吧。", "麻烦{E}。", "{E}，是多少？"]},
}
ANSWER_OPS = {"en": {"+": "+", "-": "-", "*": "×"}, "zh": {"+": "加", "-": "减", "*": "乘"}}


def frames_for(lang: str, expression: str) -> list[str]:
    return REQUEST_FRAMES[lang] if expression.startswith("!") else FRAMES[lang]


def wording(rng: random.Random, lang: str, op: str, held_out: bool) -> tuple[str, str]:
    """(expression, frame) drawn from the trained productions only, or (held_out) with at least
    one held-out production."""
    hold = HELD_OUT[lang]
    while True:
        e = rng.choice(EXPRESSIONS[lang][op])
        f = rng.choice(frames_for(lang, e))
        if (e in hold[op] or f in hold["frames"]) == held_out:
            return e, f


def steps(op: str, a: int, b: int) -> list[tuple[int, str, int]]:
    """The work an answer shows, as (x, op, y) terms that all equal the result.
    A product, tens then ones: 87 × 7 = 560 + 49 = 609. Each partial product is a table fact (8 ×
    7, then a zero), and the sum is one the model already does; written at once, the hundreds
    digit of 609 needs the whole product before its first character.
    A sum or a difference, one column of the second operand at a time, hundreds first:
    756 + 357 = 1056 + 57 = 1106 + 7 = 1113, 503 - 287 = 303 - 87 = 223 - 7 = 216. Each step
    carries (borrows) at most from the one column it adds, where a step that took the hundreds
    and tens at once (756 + 357 = 1106 + 7) needed the tens' carry before the hundreds digit:
    most misses of that form (docs/lab-notes.md, the grammar version)."""
    if op == "*":
        return [(a, "*", b)] + ([(a // 10 * 10 * b, "+", a % 10 * b)] if a >= 10 and b >= 2 else [])
    terms, x, rest = [(a, op, b)], a, b
    for place in (100, 10):
        if rest >= place and rest % place:  # a column to take now and more after it
            column = rest // place * place
            x, rest = (x + column if op == "+" else x - column), rest - column
            terms.append((x, op, rest))
    return terms


def answer(lang: str, op: str, a: int, b: int) -> str:
    """The problem restated in one canonical form, its work, then the result: 756 + 357 = 1056 +
    57 = 1106 + 7 = 1113. (en), 756加357等于1056加57，等于1106加7，等于1113。(zh)."""
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    sep = " " if lang == "en" else ""
    terms = [f"{x}{sep}{ANSWER_OPS[lang][o]}{sep}{y}" for x, o, y in steps(op, a, b)] + [str(c)]
    if lang == "en":
        return " = ".join(terms) + "."
    return terms[0] + "等于" + "，等于".join(terms[1:]) + "。"


def conversation(rng: random.Random, op: str, a: int, b: int, held_out: bool = False) -> dict:
    """A chat asking op of (a, b) (a >= b for -; for *, b is the one-digit factor). The answer
    is canonical: a sum keeps the order the question says its operands in, a difference puts
    the minuend first, a product the two-digit factor first (its worked form needs that)."""
    lang = rng.choice(["en", "zh"])
    while True:
        e, f = wording(rng, lang, op, held_out)
        x, y = (a, b)
        if op == "+" and rng.random() < 0.5:
            x, y = b, a  # either order is the same sum; the answer follows the question
        if op == "*" and rng.random() < 0.5:
            x, y = b, a  # the one-digit factor first, as often as last
        words = rng.choice(OP_WORDS[lang][op])
        expression = e.lstrip("!").format(a=number(x, lang, rng), b=number(y, lang, rng), op=words)
        if lang == "en" and f[0] == "{" and expression[0].islower() and rng.random() < 0.5:
            expression = expression[0].upper() + expression[1:]
        q = rng.choice(COURTESY[lang]) + f.format(E=expression)
        if rng.random() < 0.15:
            q = q.lower() if lang == "en" else q.rstrip("。？?")
        # the answer's order: for + the first operand the question names (by position in e)
        first_b = e.index("{b}") < e.index("{a}")
        s, t = (y, x) if first_b else (x, y)
        if op == "-":
            s, t = a, b
        elif op == "*":
            s, t = max(a, b), min(a, b)
        ans = answer(lang, op, s, t)
        if len(q) + len(ans) + 4 <= MAX_CHARS:  # + <|user|> <|end|> <|assistant|> <|end|>
            return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
                    "group": lang, "wording": (e, f), "problem": (op, a, b)}


def problem(rng: random.Random, ops: str = "+-*") -> tuple[str, int, int]:
    op = rng.choice(ops)
    if op == "*":
        return op, rng.randrange(100), rng.randrange(10)
    a, b = rng.randrange(1000), rng.randrange(1000)
    return (op, max(a, b), min(a, b)) if op == "-" else (op, a, b)  # no negative answers


# Training draws its problems where the models missed (1,000 test questions, uniform operands):
# differences more often than sums and products (the products are 1,000 facts, all in
# training), a quarter of them of close operands (869 - 863 = 69 - 63 = 9 - 3 = 6: a step's
# length hangs on the tens digits, and it was most misses of the uniform mix), and a sixth of
# the operands of + and - with one or two digits (56 - 5: one question in a hundred has two such
# operands when drawn uniformly, and people ask them most), and a fifth of the sums with tens
# digits adding up to 9, so the last step adds its ones to a 9 in the tens (1791 + 9: nearly all
# the sum misses of the column-at-a-time answers without it). The val and test questions stay
# uniform. Twice these shares trained less on the uniform problems and failed one seed of two
# (docs/lab-notes.md).
TRAIN_OPS = {"+": 0.3, "-": 0.4, "*": 0.3}
SMALL, CLOSE = 1 / 6, 1 / 4  # shares of operands with one or two digits, of differences of close operands
NINES = 1 / 5  # share of sums whose tens digits add up to 9 (a >= 10)


def training_problem(rng: random.Random) -> tuple[str, int, int]:
    op = rng.choices(list(TRAIN_OPS), weights=list(TRAIN_OPS.values()))[0]
    if op == "*":
        return op, rng.randrange(100), rng.randrange(10)
    a, b = (rng.randrange(10 ** rng.choice([1, 2])) if rng.random() < SMALL else rng.randrange(1000)
            for _ in range(2))
    if op == "-" and rng.random() < CLOSE:
        a = max(a, b)
        b = max(0, a - rng.randrange(100))
    if op == "+" and a >= 10 and rng.random() < NINES:  # a's tens digit becomes 9 - b's (mod 10)
        a += ((9 - b // 10 % 10) % 10 - a // 10 % 10) * 10
    return (op, max(a, b), min(a, b)) if op == "-" else (op, a, b)


def key(op: str, a: int, b: int) -> tuple:
    """The same question whichever operand comes first (for + and *)."""
    return (op, a, b) if op == "-" else (op, min(a, b), max(a, b))


def make_splits(n_train: int, n_val: int, seed: int, n_rl: int = 0, n_test: int = 0) -> dict[str, list[dict]]:
    """{"train", "val" (trained wordings), "val_wordings" (held-out wordings), "rl_train",
    "test", "test_wordings"}: the test problems are drawn first, from a generator of their own
    (so they depend on seed and n_test alone: models trained on other mixes meet the same test),
    then the val problems; train and rl_train never use the operands of either."""
    rng = random.Random(seed)
    held, splits = set(), {}

    def held_out(kind, n, rng, ops):  # the kind's two files: trained wordings, then held-out ones
        for name, unseen in ((kind, False), (kind + "_wordings", True)):
            splits[name] = []
            while len(splits[name]) < n:
                op, a, b = problem(rng, ops)
                if key(op, a, b) not in held:
                    held.add(key(op, a, b))
                    splits[name].append(conversation(rng, op, a, b, unseen))

    # no products in test: the range has 1,000 of them and training should know every one
    held_out("test", n_test, random.Random(seed + 1), "+-")
    held_out("val", n_val, rng, "+-*")
    for name, n, draw in (("train", n_train, training_problem), ("rl_train", n_rl, problem)):
        splits[name] = []
        while len(splits[name]) < n:
            op, a, b = draw(rng)
            if key(op, a, b) not in held:
                splits[name].append(conversation(rng, op, a, b))
    return splits


def plain_text(records: list[dict]) -> str:
    """The problems as plain sentences (question, then answer), one per line: the char
    vocabulary of the chats, and a corpus for whoever wants to pretrain first."""
    return "\n".join(" ".join(t["content"] for t in r["conversations"]) for r in records) + "\n"


def prompt_records(records: list[dict]) -> list[dict]:
    """eval.py --prompts / rl.py lines: the question, its exact reference answer, its language."""
    return [{"prompt": r["conversations"][0]["content"], "reference": r["conversations"][1]["content"],
             "group": r["group"]} for r in records]


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--name", default="arith", help="writes data/<name> and data/<name>_base")
    p.add_argument("--n_train", type=int, default=120000)
    p.add_argument("--n_val", type=int, default=200, help="questions in each val split")
    p.add_argument("--n_rl", type=int, default=5000, help="questions for rl.py (data/<name>/rl_train.jsonl)")
    p.add_argument("--n_test", type=int, default=1000,
                   help="questions in each test file: test_operands.jsonl, test_wordings.jsonl")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    if args.n_train < 1 or args.n_val < 1 or args.n_rl < 0 or args.n_test < 0:
        p.error("--n_train and --n_val must be at least 1, --n_rl and --n_test at least 0")
    splits = make_splits(args.n_train, args.n_val, args.seed, args.n_rl, args.n_test)
    base = f"{args.name}_base"
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split in ("train", "val"):
            files[split] = os.path.join(tmp, f"{split}.jsonl")
            write_jsonl(files[split], [{"conversations": r["conversations"]} for r in splits[split]])
        corpus = os.path.join(tmp, "corpus.txt")
        text = plain_text(splits["train"])
        # the vocabulary holds every split's characters (a val question must lose none), but the
        # corpus only train's problems: whoever pretrains on it must not see the val questions
        extra = sorted(set(plain_text([r for s in splits.values() for r in s])) - set(text))
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(text + "".join(extra) + ("\n" if extra else ""))
        prepare_text(["--input", corpus, "--name", base, "--tokenizer", "char", "--val_fraction", "0.02",
                      "--chunk_size", "65536"])
        summary = build_sft_dataset([files["train"]], os.path.join("data", base), os.path.join("data", args.name),
                                    max_length=MAX_CHARS + 8, val_inputs=[files["val"]], seed=args.seed)
    out = os.path.join("data", args.name)
    for split, file in (("val", "val_operands"), ("val_wordings", "val_wordings"), ("rl_train", "rl_train"),
                        ("test", "test_operands"), ("test_wordings", "test_wordings")):
        write_jsonl(os.path.join(out, f"{file}.jsonl"), prompt_records(splits[split]))
    print(f"data/{base}: plain problems; data/{args.name}: {len(splits['train'])} train chats, {args.n_val} val "
          f"(trained wordings, also val_operands.jsonl), {args.n_val} in held-out wordings (val_wordings.jsonl), "
          f"{args.n_rl} rl.py questions (rl_train.jsonl), 2 x {args.n_test} test questions (test_operands.jsonl, "
          "test_wordings.jsonl)")
    return summary


if __name__ == "__main__":
    cli(main)
