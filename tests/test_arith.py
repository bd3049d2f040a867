"""prepare/arith.py: a seeded chat set whose val questions never occur in training."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_script
from prepare import arith
from tokenizer import load_meta


def test_val_questions_are_held_out_and_the_split_is_seeded():
    train, val = arith.make_splits(3000, 100, seed=5)
    again = arith.make_splits(3000, 100, seed=5)
    assert (train, val) == again and len(val) == 100

    def keys(records):
        out = set()
        for r in records:
            answer = r["conversations"][1]["content"]
            nums = [int(n) for n in "".join(c if c.isdigit() else " " for c in answer).split()]
            op = next(o for o, words in (("-", "-减"), ("*", "×乘"), ("+", "+加")) if any(w in answer for w in words))
            assert {"+": nums[0] + nums[1], "-": nums[0] - nums[1], "*": nums[0] * nums[1]}[op] == nums[-1]
            if len(nums) == 5:  # a product's work: tens times the digit, plus ones times the digit
                assert op == "*" and nums[2:4] == [nums[0] // 10 * 10 * nums[1], nums[0] % 10 * nums[1]]
            else:
                assert len(nums) == 3
            out.add(arith.key(op, nums[0], nums[1]))
        return out
    assert not keys(train) & keys(val)
    langs = {any("\u4e00" <= ch <= "\u9fff" for ch in r["conversations"][0]["content"]) for r in val}
    assert langs == {True, False}  # both languages


def test_prepare_writes_base_text_and_chats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arith.main(["--n_train=400", "--n_val=20"])
    assert load_meta("data/arith_base")["kind"] == "char"
    meta = load_meta("data/arith")
    assert meta["task"] == "sft" and "<|assistant|>" in meta["special_tokens"]
    starts = np.fromfile(os.path.join("data", "arith", "val.idx"), dtype=np.uint64)
    assert len(starts) == 20
    assert json.loads(json.dumps(meta["source"]))["splits"]["train"]["examples"] == 400


def test_the_demo_commands_run_end_to_end(tmp_path, monkeypatch):
    """The README's three commands, shrunk: prepare, train.py config/arith.py from scratch on the
    chats (answers only), eval.py --generate scoring exact match on the held-out questions."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    monkeypatch.chdir(tmp_path)
    run_script("prepare/arith.py", "--n_train=300", "--n_val=16")
    run_script("train.py", os.path.join(ROOT, "config", "arith.py"), "--max_iters=3", "--eval_interval=3",
               "--eval_iters=1", "--n_layer=1", "--n_embd=32", "--device=cpu")
    config = json.load(open("weight/arith/config.json"))
    assert config["dataset"] == "arith" and config["group_by_length"] and config["gradient_accumulation_steps"] == 4
    run_script("eval.py", "--out_dir=weight/arith", "--generate")
    replies = json.load(open("weight/arith/eval.json"))
    assert 0.0 <= replies["exact_match"] <= 100.0 and replies["n"] == 16
    records = [json.loads(line) for line in open("weight/arith/generations.jsonl", encoding="utf-8")]
    assert len(records) == 16 and all(r["reference"].endswith((".", "。")) for r in records)
