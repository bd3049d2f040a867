"""eval.py: metric values on small fixed inputs against hand counts and the libraries' own
results; bits per byte; top-k accuracy; the pictures; the commands as users run them."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import eval as danlu_eval
import train
from conftest import TINY, make_char_dataset, run_script
from test_sft import tiny  # noqa: F401  (a fixture: the tiny SFT run)
from tokenizer import CharTokenizer

CPU = SimpleNamespace(device="cpu", autocast=torch.autocast("cpu", enabled=False))


def test_bleu_of_identical_text_is_100_and_exact_match_counts():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    records = [{"reference": "the cat sat on the mat", "reply": "the cat sat on the mat"},
               {"reference": "a dog ran far away", "reply": "a dog ran far away"}]
    m = danlu_eval.score_records(records)
    assert m["bleu"] == pytest.approx(100) and m["chrf"] == pytest.approx(100)
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == pytest.approx(100) and m["exact_match"] == 100


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_of_chinese_is_the_character_lcs_f1():
    """A whitespace tokenizer sees no words in Chinese (one project's ROUGE scored 0): here each
    character is a token, so ROUGE-L is the F1 of the longest common subsequence."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    ref, hyp = "床前明月光疑是地上霜", "床前看月光疑是霜"
    n = lcs(ref, hyp)
    p, r = n / len(hyp), n / len(ref)
    m = danlu_eval.score_records([{"reference": ref, "reply": hyp}])
    assert m["rougeL"] == pytest.approx(100 * 2 * p * r / (p + r))
    assert m["rouge1"] > 0 and m["tokenize"] == "char"


def test_rouge_splits_digits_from_chinese():
    """Han characters are word characters: a \\w+ run made "58乘7等于406" one token, so an
    identical reply had no bigram and ROUGE-2 0 (the arithmetic demo read 61 at 97.5% exact)."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    assert danlu_eval.CharAwareTokenizer().tokenize("58乘7等于406。OK") == ["58", "乘", "7", "等", "于", "406", "ok"]
    m = danlu_eval.score_records([{"reference": "58乘7等于406。", "reply": "58乘7等于406。"}])
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == pytest.approx(100)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: (1, T, V)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits, None


def test_top_k_accuracy_and_bits_per_byte_on_constructed_logits():
    # 3 positions, vocab 6: target 0 ranked 1st, target 1 ranked 3rd, target 2 ranked 6th
    logits = torch.tensor([[[9., 1, 2, 3, 4, 5], [5., 4, 3, 2, 1, 0], [0., 1, 2, 3, 4, 5]]])
    y = torch.tensor([[0, 2, 0]])
    tok = CharTokenizer(list("ab床前明月"))
    lengths = danlu_eval.token_bytes(tok, 6)
    assert lengths.tolist() == [1, 1, 3, 3, 3, 3]
    m = danlu_eval.lm_metrics(FixedLogits(logits), [(torch.zeros(1, 3, dtype=torch.long), y, None)], lengths, CPU)
    ce = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="none")
    assert m["top1_acc"] == pytest.approx(1 / 3) and m["top5_acc"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(ce.mean().item())
    # bits per byte = summed loss / ln 2 / bytes of the targets (1 + 3 + 1 bytes)
    assert m["bpb"] == pytest.approx(ce.sum().item() / math.log(2) / 5)


def test_a_char_models_bits_per_byte_is_its_loss_in_bits_per_character(tmp_path, monkeypatch):
    """On ASCII text a character is a byte: bpb = loss / ln 2 x tokens / bytes = loss / ln 2."""
    monkeypatch.chdir(tmp_path)
    make_char_dataset(tmp_path)
    train.main(TINY + ["--max_iters=5", "--out_dir=weight/a"])
    lm = danlu_eval.main(["--out_dir=weight/a", "--device=cpu"])
    assert lm["bpb"] == pytest.approx(lm["loss"] / math.log(2), rel=1e-6)
    assert json.load(open("weight/a/eval.json"))["tokens"] == lm["tokens"] > 0
    run_script("eval.py", "--plot", "weight/a", "--out=curves.png")
    assert open("curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open("weight/a/loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = danlu_eval.main(["--compare", "weight/a", "--out=compare.json"])
    assert rows["weight/a"]["loss"] == lm["loss"]


def test_score_command_rescores_a_generations_file(tmp_path):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    path = tmp_path / "gen.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "p", "reference": r, "reply": h}, ensure_ascii=False)
                              for r, h in (("12", "12"), ("三十", "三十一"))) + "\n", encoding="utf-8")
    run_script("eval.py", f"--score={path}")
    metrics = json.load(open(tmp_path / "gen.metrics.json"))
    assert metrics["exact_match"] == 50 and metrics["n"] == 2
    path.write_text('{"reply": "x"}\n')
    r = run_script("eval.py", f"--score={path}", check=False)
    assert r.returncode == 1 and "gen.jsonl:1" in r.stderr


def test_a_chat_model_replies_to_its_val_conversations_and_to_a_prompts_file(tiny):
    """The tiny SFT run of test_sft.py answers its held-out sums; eval.py writes the replies
    beside it and scores them (the sums are learned: most replies match exactly)."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    result = danlu_eval.main(["--out_dir=weight/sft_char_tiny", "--generate", "--device=cpu",
                              "--max_examples=12", "--max_new_tokens=16"])
    with open("weight/sft_char_tiny/generations.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 12 and all(set(r) == {"prompt", "reference", "reply"} for r in records)
    assert all("<|assistant|>" in r["prompt"] and "<|end|>" not in r["reference"] for r in records)
    assert result["n"] == 12 and "loss" in result and "exact_match" in result
    with open("prompts.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "add 2 3", "reference": "2+3=5."}) + "\n")
    result = danlu_eval.main(["--out_dir=weight/sft_char_tiny", "--prompts=prompts.jsonl", "--device=cpu"])
    assert result["n"] == 1


def test_a_base_is_scored_on_its_sft_data_as_sft_starts_from_it(tiny):
    """The char base has no chat tokens; eval.py grows its vocabulary as sft.py does (new rows
    at the mean row), so base and SFT model compare on the same answers: SFT lowered the loss."""
    rows = danlu_eval.main(["--compare", "weight/char_tiny", "weight/sft_char_tiny", "--dataset=sft_char_tiny",
                            "--device=cpu", "--out=compare.json"])
    base, tuned = rows["weight/char_tiny"], rows["weight/sft_char_tiny"]
    assert base["tokens"] == tuned["tokens"] > 0
    assert tuned["loss"] < base["loss"] < 20
