"""prepare/arith.py: questions from a grammar (numbers in words, both operand orders, requests and
questions), answers that are right, val operands never trained on, held-out wordings that no
training question uses but whose words it does; eval.py scores both val files per language;
sample.py --chat names the characters the model's vocabulary lacks."""
import io
import json
import os
import random
import re

import numpy as np
import pytest

from conftest import ROOT, run_script
from eval import main as eval_main
from prepare import arith
from sample import main as sample_main
from tokenizer import CharTokenizer, dropped_note, load_meta


def answer_numbers(answer: str) -> tuple[str, list[int]]:
    op = next(o for o, words in (("-", "-减"), ("*", "×乘"), ("+", "+加")) if any(w in answer for w in words))
    return op, [int(n) for n in re.findall(r"\d+", answer)]


def test_numbers_in_words():
    rng = random.Random(0)
    assert arith.en_words(305, rng) in ("three hundred and five", "three hundred five")
    assert [arith.en_words(n, rng) for n in (0, 13, 40, 42)] == ["zero", "thirteen", "forty", "forty-two"]
    assert [arith.zh_words(n, rng) for n in (0, 7, 10, 12, 20, 42, 100, 110, 305, 999)] == \
        ["零", "七", "十", "十二", "二十", "四十二", "一百", "一百一十", "三百零五", "九百九十九"]
    assert arith.zh_words(250, rng) in ("两百五十", "二百五十")


def test_answers_are_right_and_val_operands_are_held_out(monkeypatch):
    splits = arith.make_splits(3000, 100, seed=5, n_rl=200, n_test=100)
    assert splits == arith.make_splits(3000, 100, seed=5, n_rl=200, n_test=100)  # seeded
    # the test files are drawn first from a generator of their own: how training draws does not change them
    monkeypatch.setattr(arith, "TRAIN_OPS", {"+": 1.0, "-": 0.0, "*": 0.0})
    other = arith.make_splits(3000, 100, seed=5, n_rl=200, n_test=100)
    assert other["train"] != splits["train"] and {r["problem"][0] for r in other["train"]} == {"+"}
    assert all(other[k] == splits[k] for k in ("test", "test_wordings", "val", "val_wordings"))

    def keys(records):
        out = set()
        for r in records:
            op, nums = answer_numbers(r["conversations"][1]["content"])
            assert {"+": nums[0] + nums[1], "-": nums[0] - nums[1], "*": nums[0] * nums[1]}[op] == nums[-1]
            if op == "*" and len(nums) == 5:  # a product's work: tens times the digit, plus ones times the digit
                assert nums[2:4] == [nums[0] // 10 * 10 * nums[1], nums[0] % 10 * nums[1]]
            elif op in "+-":  # a sum's or difference's work: the second operand one column at a time, hundreds first
                xs, ys = nums[0:-1:2], nums[1:-1:2]
                for x, y, x2, y2 in zip(xs, ys, xs[1:], ys[1:]):
                    column = y - y2
                    assert x2 == (x + column if op == "+" else x - column) and y2 > 0
                    assert len(str(column).rstrip("0")) == 1 and len(str(column)) == len(str(y))  # its leading column
                assert len(nums) == 1 + 2 * len(arith.steps(op, nums[0], nums[1]))
            else:
                assert len(nums) == 3
            out.add(arith.key(op, nums[0], nums[1]))
        return out
    val = keys(splits["val"]) | keys(splits["val_wordings"])
    trained = keys(splits["train"]) | keys(splits["rl_train"])
    assert not trained & val
    test = keys(splits["test"]) | keys(splits["test_wordings"])
    assert len(test) == 200 and not test & (trained | val)  # no test operands anywhere else, nor twice
    for split in splits.values():
        assert {r["group"] for r in split} == {"en", "zh"}
        assert all(len(r["conversations"][0]["content"]) + len(r["conversations"][1]["content"]) + 4 <= 128
                   for r in split)


def test_held_out_wordings_are_never_trained_and_read_with_trained_words():
    splits = arith.make_splits(4000, 300, seed=1, n_rl=300)

    def held(r):
        e, f = r["wording"]
        lang = r["group"]
        op = answer_numbers(r["conversations"][1]["content"])[0]
        return e in arith.HELD_OUT[lang][op] or f in arith.HELD_OUT[lang]["frames"]
    assert not any(held(r) for s in ("train", "val", "rl_train") for r in splits[s])
    assert all(held(r) for r in splits["val_wordings"])
    used = {r["wording"] for r in splits["val_wordings"]}
    assert len(used) > 100  # many held-out combinations, not a handful

    def units(text, lang):  # words (English) or Han characters (Chinese) of a production
        text = re.sub(r"\{\w+\}", " ", text.lstrip("!"))
        text = text.replace("多少", " ")  # "how much": its 多 is not the 多 of 比{a}多{b} ("more than")
        return set(re.findall(r"[a-z']+", text.lower())) if lang == "en" else set(re.findall("[\u4e00-\u9fff]", text))
    for lang, hold in arith.HELD_OUT.items():
        trained = set()
        for op in "+-*":
            trained |= set().union(*(units(e, lang) for e in arith.EXPRESSIONS[lang][op] if e not in hold[op]))
            trained |= set().union(*(units(w, lang) for w in arith.OP_WORDS[lang][op]))
        frames = arith.FRAMES[lang] + arith.REQUEST_FRAMES[lang]
        trained |= set().union(*(units(f, lang) for f in frames + arith.COURTESY[lang] if f not in hold["frames"]))
        for production in [e for op in "+-*" for e in hold[op]] + hold["frames"]:
            assert units(production, lang) <= trained, (lang, production)  # readable: no unseen word


def test_the_grammar_asks_in_many_ways():
    rng = random.Random(3)
    questions = [arith.conversation(rng, *arith.problem(rng))["conversations"][0]["content"] for _ in range(3000)]
    text = "\n".join(questions)
    for phrase in ("hundred", "百", "subtract", "from", "times", "×", "乘以", "请", "please", "?", "？"):
        assert phrase in text.lower(), phrase
    # both operand orders of a difference: "subtract b from a" names the subtrahend first
    assert any(q.lower().startswith("subtract") or "subtract " in q.lower() for q in questions)
    assert len(set(questions)) > 2900


def test_prepare_writes_base_text_chats_and_val_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arith.main(["--n_train=400", "--n_val=20", "--n_rl=30", "--n_test=10"])
    assert load_meta("data/arith_base")["kind"] == "char"
    meta = load_meta("data/arith")
    assert meta["task"] == "sft" and "<|assistant|>" in meta["special_tokens"]
    assert len(np.fromfile(os.path.join("data", "arith", "val.idx"), dtype=np.uint64)) == 20
    assert meta["source"]["splits"]["train"]["examples"] == 400
    tok = CharTokenizer(meta["chars"])
    for name, n in (("val_operands", 20), ("val_wordings", 20), ("rl_train", 30), ("test_operands", 10),
                    ("test_wordings", 10)):
        lines = [json.loads(x) for x in open(f"data/arith/{name}.jsonl", encoding="utf-8")]
        assert len(lines) == n and {"prompt", "reference", "group"} <= set(lines[0])
        assert all(not tok.unknown_chars(r["prompt"] + r["reference"]) for r in lines)  # nothing dropped
    # the plain corpus holds train's problems only: whoever pretrains on it never sees a val question
    corpus = open("data/arith_base/train.bin", "rb").read() + open("data/arith_base/val.bin", "rb").read()
    base = CharTokenizer(load_meta("data/arith_base")["chars"])
    text = base.decode(np.frombuffer(corpus, dtype=np.uint16).tolist())
    held_out = [json.loads(line) for line in open("data/arith/val_wordings.jsonl", encoding="utf-8")]
    assert all(r["prompt"] not in text for r in held_out)


def test_dropped_characters_are_named():
    tok = CharTokenizer(list("0123456789+ abc"))
    assert tok.unknown_chars("1 + 2") == [] and dropped_note(tok, "1 + 2") is None
    assert tok.unknown_chars("ab ä3３ä") == ["ä", "３"]
    note = dropped_note(tok, "ab ä3３ä")
    assert "'ä'" in note and "'３'" in note and "\n" not in note


def test_the_demo_commands_run_end_to_end(tmp_path, monkeypatch, capsys):
    """The README's commands, shrunk: prepare, train.py config/arith.py from scratch on the chats
    (answers only), eval.py --generate on the trained wordings and --prompts on the held-out
    wordings (exact match per language), and a chat whose unknown characters are named."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    monkeypatch.chdir(tmp_path)
    run_script("prepare/arith.py", "--n_train=300", "--n_val=16", "--n_rl=8")
    run_script("train.py", os.path.join(ROOT, "config", "arith.py"), "--max_iters=3", "--eval_interval=3",
               "--eval_iters=1", "--n_layer=1", "--n_embd=32", "--device=cpu")
    config = json.load(open("weight/arith/config.json"))
    assert config["dataset"] == "arith" and config["group_by_length"] and config["block_size"] == 128
    run_script("eval.py", "--out_dir=weight/arith", "--generate")
    replies = json.load(open("weight/arith/eval.json"))
    assert 0.0 <= replies["exact_match"] <= 100.0 and replies["n"] == 16
    scored = eval_main(["--out_dir=weight/arith", "--generate", "--prompts=data/arith/val_wordings.jsonl"])
    assert scored["n"] == 16 and {"exact_match_en", "exact_match_zh"} <= set(scored)
    assert " en " in capsys.readouterr().out
    records = [json.loads(line) for line in open("weight/arith/generations.jsonl", encoding="utf-8")]
    assert len(records) == 16 and all(x["group"] in ("en", "zh") and x["reference"].endswith((".", "。"))
                                      for x in records)
    monkeypatch.setattr("sys.stdin", io.StringIO("1 ä 2\n"))
    sample_main(["--out_dir=weight/arith", "--chat", "--max_new_tokens=4"])
    assert "lacks 'ä'" in capsys.readouterr().err
