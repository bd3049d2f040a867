"""sft.py: a short SFT run from a tiny pretrained char model lowers the val loss on answers and
logs sample replies; vocabulary growth; tokenizer and architecture mismatches; exact resume."""
import json
import os
import random

import numpy as np
import pytest
import torch

import sft
import tokenizer
import train
from checkpoint import load_checkpoint
from settings import ConfigError
from conftest import ROOT, run_script
from data import BinWriter
from checkpoint import grow_vocab
from model import GPT, GPTConfig
from prepare.sft import build_sft_dataset

CONFIG = os.path.join(ROOT, "config", "sft_char_tiny.py")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?+="
GREETINGS = ("hello", "hi", "hey", "good day")
GREETING_REPLY = "hi! ask me a sum."
WORDS = "the a sum of two and is ask me day good small model learns to add numbers".split()


def sum_turns(rng: random.Random) -> list[dict]:
    a, b = rng.randrange(10), rng.randrange(10)
    return [{"role": "user", "content": f"add {a} {b}"},
            {"role": "assistant", "content": f"{a}+{b}={a + b}."}]


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Conversations a tiny char model learns in seconds: a greeting gets a fixed reply, a sum
    its answer; some have a system turn or a second exchange."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        turns = [{"role": "system", "content": "be brief."}] if rng.random() < 0.2 else []
        if rng.random() < 0.4:
            turns += [{"role": "user", "content": rng.choice(GREETINGS)},
                      {"role": "assistant", "content": GREETING_REPLY}]
        turns += sum_turns(rng)
        records.append({"conversations": turns})
    return records


def write_char_base(data_dir: str, chars: str = CHARS, seed: int = 0) -> None:
    """A pretrain dataset of random words and sums written in `chars`."""
    rng = random.Random(seed)
    pieces = [rng.choice(WORDS) if rng.random() < 0.6 else
              f"{(a := rng.randrange(10))}+{(b := rng.randrange(10))}={a + b}." for _ in range(12000)]
    text = " ".join(pieces)
    tok = tokenizer.CharTokenizer(sorted(set(chars)))
    ids = tok.encode(text)
    cut = int(0.9 * len(ids))
    for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
        w = BinWriter(os.path.join(data_dir, f"{split}.bin"), tok.vocab_size)
        w.write(part)
        w.close()
    tokenizer.save_meta(data_dir, tok.to_meta(source="tests/test_sft.py"))


def build_tiny_run(work) -> str:
    """In folder work: data/char_tiny, weight/char_tiny (pretrained), data/sft_char_tiny and
    weight/sft_char_tiny (config/sft_char_tiny.py). Built once per test session; returns work."""
    work = str(work)
    if os.path.exists(os.path.join(work, "done")):
        return work
    cwd = os.getcwd()
    os.chdir(work)
    try:
        write_char_base("data/char_tiny")
        train.main(["--dataset=char_tiny", "--out_dir=weight/char_tiny", "--device=cpu",
                    "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=16",
                    "--learning_rate=3e-3", "--max_iters=150", "--warmup_iters=10",
                    "--eval_interval=150", "--eval_iters=2", "--log_interval=50"])
        with open("chats.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in chat_records(400))
        build_sft_dataset(["chats.jsonl"], "data/char_tiny", "data/sft_char_tiny",
                          max_length=65, val_fraction=0.1)
        sft.main([CONFIG])
        open("done", "w").close()
    finally:
        os.chdir(cwd)
    return work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # One thread: on a shared CPU, two threads fighting other processes make a model this
    # small several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.getbasetemp() / "tiny_sft_run"  # shared with test_chat.py
    work.mkdir(exist_ok=True)
    try:
        build_tiny_run(work)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            yield work
    finally:
        torch.set_num_threads(threads)


def read_log(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the run

def test_sft_lowers_val_loss_on_answers_and_logs_samples(tiny):
    evals = [r for r in read_log("weight/sft_char_tiny") if "val_loss" in r]
    assert evals[0]["iter"] == 0 and len(evals) >= 3
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"], [e["val_loss"] for e in evals]
    for e in evals:  # samples at every eval, JSON as logged
        assert [s["prompt"] for s in e["samples"]] == ["hello", "add 2 3"]
        assert all(isinstance(s["reply"], str) for s in e["samples"])
    assert evals[-1]["samples"][0]["reply"] == GREETING_REPLY
    ckpt = load_checkpoint("weight/sft_char_tiny")
    pre = load_checkpoint("weight/char_tiny")
    assert ckpt["tokenizer"]["vocab_size"] == pre["tokenizer"]["vocab_size"] + len(tokenizer.CHAT_TOKENS)
    assert ckpt["model_config"]["vocab_size"] == ckpt["tokenizer"]["vocab_size"]
    # the architecture was taken from the checkpoint, not from SFTConfig's defaults
    assert ckpt["train_config"]["n_layer"] == ckpt["model_config"]["n_layer"] == 2


def test_max_iters_derived_from_epochs(tiny):
    cfg = load_checkpoint("weight/sft_char_tiny")["train_config"]
    n_train = len(np.fromfile("data/sft_char_tiny/train.idx", dtype=np.uint64))
    assert cfg["max_iters"] == round(cfg["epochs"] * (n_train // cfg["batch_size"]))


# ----------------------------------------------------------------------------- vocabulary growth

@pytest.mark.parametrize("tied", [True, False])
def test_grow_vocab_new_rows_are_the_mean_and_old_logits_stay(tied):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=2, n_embd=16,
                          tie_embeddings=tied)).eval()
    old_wte = model.transformer.wte.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    grown = grow_vocab(model, 14, range(10, 14)).eval()
    wte, head = grown.transformer.wte.weight, grown.lm_head.weight
    assert wte.shape == head.shape == (14, 16)
    assert torch.equal(wte[:10], old_wte) and torch.equal(head[:10], old_head)
    assert torch.allclose(wte[10:], old_wte.mean(0).expand(4, -1))
    assert torch.allclose(head[10:], old_head.mean(0).expand(4, -1))
    assert (wte.data_ptr() == head.data_ptr()) == tied
    x = torch.randint(0, 10, (2, 12))
    with torch.no_grad():
        assert torch.allclose(grown(x)[0][..., :10], model(x)[0], atol=1e-6)


def test_grow_vocab_reuses_padding_rows():
    """A padded vocabulary (64 * k rows, fewer real tokens): new tokens take padding rows, set to
    the mean of the real ones; the matrix grows only if the padding runs out."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    old = model.transformer.wte.weight.detach().clone()
    grown = grow_vocab(model, 16, range(10, 13))
    w = grown.transformer.wte.weight
    assert w.shape == (16, 8)
    assert torch.allclose(w[10:13], old[:10].mean(0).expand(3, -1))
    assert torch.equal(w[:10], old[:10]) and torch.equal(w[13:], old[13:])


# ----------------------------------------------------------------------------- mismatches

def test_tokenizer_mismatch_is_a_clear_error():
    char = tokenizer.CharTokenizer(list("abc")).to_meta()
    other_char = tokenizer.CharTokenizer(list("abd")).to_meta()
    vocab = tokenizer.VocabTokenizer(["a", "b", "c"]).to_meta()
    for base, data in ((char, other_char), (char, vocab)):
        with pytest.raises(ConfigError, match=r"(?s)SFT dataset data/x uses a .* but the checkpoint weight/p"):
            sft.check_tokenizer(base, data, "weight/p", "data/x", "pre")
    grown = tokenizer.CharTokenizer(list("abc"))
    grown.add_special_tokens(tokenizer.CHAT_TOKENS)
    assert sft.check_tokenizer(char, grown.to_meta(), "p", "d", "pre") == range(3, 8)


def test_sft_on_data_from_another_tokenizer_fails_before_training(tiny):
    write_char_base("data/other_base", chars=CHARS + "XYZ")
    with open("other.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in chat_records(20))
    build_sft_dataset(["other.jsonl"], "data/other_base", "data/other_sft", max_length=65)
    with pytest.raises(ConfigError, match=r"char tokenizer \(46 characters.*char tokenizer \(43 char"):
        sft.main([CONFIG, "--dataset=other_sft", "--out_dir=weight/other_sft"])
    assert not os.path.exists("weight/other_sft/ckpt.pt")


def test_architecture_keys_come_from_the_checkpoint(tiny):
    with pytest.raises(ConfigError, match=r"n_layer = 5, but the pretrained checkpoint .* n_layer = 2"):
        sft.main([CONFIG, "--n_layer=5", "--out_dir=weight/arch"])
    with pytest.raises(ConfigError, match="needs base"):
        sft.main(["--dataset=sft_char_tiny"])


# ----------------------------------------------------------------------------- resume

def test_resume_continues_the_loss_curve_exactly(tiny):
    """Stopping after 25 iterations (22 batches make an epoch, so mid-way through the second)
    and resuming in a new process gives the losses and weights of one uninterrupted
    30-iteration run, bit for bit: the same schedule (lr_decay_iters fixed), the same batches,
    the same optimizer state, the same dropout masks."""
    common = [CONFIG, "--lr_decay_iters=30", "--log_interval=1", "--eval_interval=100",
              "--sample_prompts=", "--batch_size=16", "--dropout=0.1"]
    run_script("sft.py", *common, "--out_dir=weight/whole", "--max_iters=30")
    run_script("sft.py", *common, "--out_dir=weight/parts", "--max_iters=25")
    assert load_checkpoint("weight/parts")["loader"]["epoch"] == 1  # stopped mid-epoch
    run_script("sft.py", *common, "--out_dir=weight/parts", "--max_iters=30")  # init_from = auto
    whole, parts = read_log("weight/whole"), read_log("weight/parts")
    losses = [[(r["iter"], r["train_loss"]) for r in log if "lr" in r] for log in (whole, parts)]
    assert [i for i, _ in losses[1]] == list(range(1, 31))
    assert losses[1] == losses[0]
    a, b = (load_checkpoint(f"weight/{d}/ckpt.pt")["model"] for d in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="holds an SFT run"):
        sft.main(common + ["--out_dir=weight/parts", "--max_iters=30", "--base=weight/whole"])
