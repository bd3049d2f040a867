"""tiny_cls end to end: prepare the embedded digits, train config/tiny_cls.py briefly, classify
(the val split and a JSONL file), and pin that accuracy reads the prediction at <CLS>."""
import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import classify
import sample
import tokenizer
import train
from checkpoint import load_model
from conftest import ROOT
from data import Examples
from model import GPTConfig
from prepare import tiny_cls

CONFIG = os.path.join(ROOT, "config", "tiny_cls.py")
# The shipped config (Muon, loss mix, augmented data) with a model and schedule small enough for
# a test: ~5 s of training on one thread. The schedule decays over the overridden max_iters (the
# config leaves lr_decay_iters at 0); 300 steps measured 82.7% (200 steps: 58-64%).
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--batch_size=32",
        "--max_iters=300", "--warmup_iters=10", "--eval_interval=150",
        "--log_interval=50"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, run dir, train summary) of one short run, shared by the tests below."""
    root = tmp_path_factory.mktemp("tiny_cls")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        data_dir = os.path.join(root, tiny_cls.main([]))  # the README's prepare, default flags
        out_dir = os.path.join(root, "weight", "tiny_cls")
        # absolute paths: sample.py finds the dataset from the checkpoint wherever it runs
        summary = train.main([CONFIG, *TINY, f"--dataset={data_dir}", f"--out_dir={out_dir}"])
        yield data_dir, out_dir, summary


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_report(r: dict, n: int) -> None:
    """cls_eval.json's fields (DESIGN.md) and their agreement with each other."""
    confusion = np.array(r["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == r["n"] == n
    assert r["accuracy"] == pytest.approx(np.trace(confusion) / n)
    assert 0.1 <= r["mean_confidence"] <= 1.0
    assert sorted(r["per_class"], key=int) == [str(k) for k in range(10)]
    for k, m in r["per_class"].items():
        k = int(k)
        assert set(m) == {"precision", "recall", "f1", "support"}
        assert m["support"] == confusion[k].sum()
        if confusion[k].sum():
            assert m["recall"] == pytest.approx(confusion[k, k] / confusion[k].sum(), abs=1e-4)
        if confusion[:, k].sum():
            assert m["precision"] == pytest.approx(confusion[k, k] / confusion[:, k].sum(), abs=1e-4)


def test_train_logs_val_acc_and_classify_writes_report(trained):
    data_dir, out_dir, summary = trained
    assert summary["iters"] == 300
    evals = [r for r in read_jsonl(os.path.join(out_dir, "log.jsonl")) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 150, 300]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in evals)
    lrs = [r["lr"] for r in read_jsonl(os.path.join(out_dir, "log.jsonl")) if "lr" in r]
    assert lrs[-1] < 0.05 * max(lrs)  # decayed over --max_iters=300, not the config's 600
    sample.main([f"--out_dir={out_dir}", "--classify", "--device=cpu"])
    with open(os.path.join(out_dir, "cls_eval.json")) as f:
        r = json.load(f)
    check_report(r, n=359)  # the embedded digits' val split
    assert r["accuracy"] == pytest.approx(evals[-1]["val_acc"])  # the final weights were saved
    assert r["accuracy"] > 0.6, r["accuracy"]  # chance is 10%; 82.7% measured


def test_val_loss_scores_the_class_token_alone(trained):
    """The config trains on 0.1 x next-pixel loss as well, but the logged val_loss is the loss on
    <CLS_k> alone (one target per example): it means the same whatever that weight is."""
    data_dir, out_dir, _ = trained
    model, ckpt = load_model(out_dir)
    cfg = ckpt["train_config"]
    assert cfg["prompt_loss_weight"] == 0.1
    loader = Examples(data_dir, "val", model.config.block_size, cfg["batch_size"],
                      model.config.vocab_size, shuffle=False)  # prompt_loss_weight 0
    total, n = 0.0, 0
    with torch.no_grad():
        for idx, (x, y, w) in loader.iter_batches("cpu", cfg["eval_iters"]):
            assert w is None and ((y != -1).sum(1) == 1).all()  # the class token only
            total += model(x, y)[1].item() * len(idx)
            n += len(idx)
    last = [r for r in read_jsonl(os.path.join(out_dir, "log.jsonl")) if "val_loss" in r][-1]
    assert last["val_loss"] == pytest.approx(total / n, rel=1e-5)


def test_classify_jsonl_matches_the_split(trained, tmp_path):
    """The first 40 val images as a user's JSONL (half with the old `<CLS> <CLS> <EOS>` tail):
    the --jsonl path must give exactly the predictions the split gives for those examples."""
    data_dir, out_dir, _ = trained
    meta = tokenizer.load_meta(data_dir)
    tok = tokenizer.from_meta(meta)
    loader = Examples(data_dir, "val", 68, 40, meta["vocab_size"], shuffle=False)
    x, y, _ = loader.collate(np.arange(40))
    cls_id = meta["special_tokens"]["<CLS>"]
    labels = classify.batch_labels(x, y, cls_id, classify.class_token_ids(meta)).tolist()
    path = tmp_path / "val40.jsonl"
    with open(path, "w") as f:
        for b, label in enumerate(labels):
            words = tok.decode(x[b].tolist()).split()  # <IMG> codes </IMG> <CLS> <CLS_k>
            assert words[-2:] == ["<CLS>", f"<CLS_{label}>"]
            if b % 2:
                words = words[:-1] + ["<CLS>"]  # the old tail: no answer in the answer slot
            f.write(json.dumps({"tokens": " ".join(words + ["<EOS>"]), "label": label}) + "\n")
    sample.main([f"--out_dir={out_dir}", "--classify", f"--jsonl={path}", "--device=cpu"])
    with open(os.path.join(out_dir, "cls_eval.json")) as f:
        r = json.load(f)
    check_report(r, n=40)
    assert r["source"] == str(path)
    model, _ = load_model(out_dir)
    out = classify.evaluate(model, [(x, y)], meta, nullcontext())
    expected = classify.report(out["pred"], out["label"], out["confidence"], 10)
    assert r["confusion"] == expected["confusion"]
    assert r["mean_confidence"] == pytest.approx(expected["mean_confidence"], abs=1e-5)


class PlantedLogits(torch.nn.Module):
    """A stand-in for GPT: body() returns logits planted by the test, head() passes them on."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.config = GPTConfig(cls_head="lm")  # classify reads the class off the LM head

    def body(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape == self.logits.shape[:2]
        return self.logits

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return h


def test_accuracy_reads_the_prediction_at_cls():
    """Rows of different lengths, right-padded. The logits favour the true class only at the
    <CLS> position; one position earlier or later (an off-by-one), or the padding, favour
    others. So accuracy is 1 exactly when the code reads <CLS>, and the label is read from the
    target there (y at <CLS> = <CLS_k>)."""
    tok = tiny_cls.image_tokenizer(n_codes=4)
    meta = tok.to_meta(task="classify", class_tokens=tiny_cls.class_tokens(), cls_token="<CLS>",
                       num_classes=10)
    cls_id, class_ids = tok.stoi["<CLS>"], classify.class_token_ids(meta)
    labels, lengths = [3, 7, 0], [3, 6, 1]  # image codes per row
    T = max(lengths) + 4
    x = torch.full((3, T), tok.stoi["<PAD>"])
    y = torch.full((3, T), -1)
    logits = torch.zeros(3, T, tok.vocab_size)
    for b, (label, n) in enumerate(zip(labels, lengths)):
        seq = tiny_cls.image_sequences(np.full((1, n), b % 4), np.array([label]), tok)[0]
        x[b, :len(seq) - 1] = torch.from_numpy(seq[:-1])  # x drops <EOS>, as the loader does
        pos = n + 2  # <IMG> + n codes + </IMG>, then <CLS>
        assert x[b, pos] == cls_id
        y[b, pos] = class_ids[label]
        logits[b, :, class_ids[(label + 5) % 10]] = 4.0  # everywhere, padding included
        logits[b, pos - 1, class_ids[(label + 1) % 10]] = 9.0
        logits[b, pos + 1, class_ids[(label + 2) % 10]] = 9.0
        logits[b, pos, class_ids[label]] = 8.0
    assert classify.cls_positions(x, cls_id).tolist() == [n + 2 for n in lengths]
    assert classify.batch_labels(x, y, cls_id, class_ids).tolist() == labels
    out = classify.evaluate(PlantedLogits(logits), [(x, y)], meta, nullcontext())
    assert out["pred"].tolist() == labels and out["label"].tolist() == labels
    expected_conf = torch.softmax(torch.tensor([8.0, 4.0] + [0.0] * 8), 0)[0].item()
    assert out["confidence"] == pytest.approx([expected_conf] * 3, abs=1e-6)
