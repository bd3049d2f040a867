"""Exactness, run the way users run it: resume in a new process equals an uninterrupted run;
the loss of a step is the mean over all its targets, so micro-batching and processes do not
change it; data streams are shared by all ranks; the checkpoint policy."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import runtime
import settings
import train
from checkpoint import CKPT_VERSION, load_checkpoint, save_checkpoint
from conftest import TINY, make_char_dataset, read_log, run_script, step_losses
from data import ExampleWriter, Examples, TokenWindows
from tokenizer import VocabTokenizer, save_meta
def weights(out_dir: str, name: str = "ckpt.pt") -> dict:
    return load_checkpoint(os.path.join(out_dir, name))["model"]


# ----------------------------------------------------------------------------- resume

def test_resume_in_a_new_process_equals_an_uninterrupted_run(tiny_data):
    """20 iterations straight vs 10, then --init_from=resume to 20 in a second process, with
    dropout on: every logged loss and every weight equal, bit for bit. (The old code drew the
    MFU peak's random matrices from the global generator after restoring it, so from the
    first resumed step on the dropout masks differed.)"""
    args = TINY + ["--dropout=0.1", "--eval_interval=5", "--lr_decay_iters=20"]
    run_script("train.py", *args, "--max_iters=20", "--out_dir=weight/full")
    run_script("train.py", *args, "--max_iters=10", "--out_dir=weight/split")
    run_script("train.py", *args, "--max_iters=20", "--out_dir=weight/split", "--init_from=resume")
    assert step_losses("weight/split") == step_losses("weight/full")
    assert len(step_losses("weight/full")) == 20
    a, b = weights("weight/full"), weights("weight/split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_measuring_the_peak_leaves_the_global_generator_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path))  # empty: the peak is measured
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    runtime.peak_flops("cpu", "float32")
    assert torch.equal(torch.rand(3), expected)


def test_checkpoints_load_on_the_cpu_whatever_the_run_device(tiny_data):
    """The resume state never lands on the run's device (on CUDA the old RNG ByteTensors
    did, and torch.set_rng_state raised); with a 'meta' run device it still loads on the CPU,
    and the weights are handed over once (no second copy kept for the run)."""
    train.main(TINY + ["--max_iters=3", "--out_dir=weight/a"])
    cfg = settings.load_config(train.TrainConfig, TINY + ["--out_dir=weight/a", "--init_from=resume"])
    run = SimpleNamespace(device="meta", world_size=1, rank=0)
    state = train.resume_state(cfg, run, train.model_config_for(cfg, train.load_meta("data/tiny")))
    tensors = [t for opt in state["optimizer"] for s in opt["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor)] + list(state["model"].values())
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert "rng" not in state and state["format_version"] == CKPT_VERSION


def test_version_1_checkpoint_is_upgraded(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {}, "model_config": {}, "rng": [{"loader": {}}, {"loader": {}}]})
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 1
    torch.save(raw, path)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == CKPT_VERSION and ckpt["loader"] is None and ckpt["world_size"] == 2


def test_a_changed_learning_rate_takes_effect_on_resume(tiny_data):
    train.main(TINY + ["--max_iters=4", "--out_dir=weight/a", "--decay_lr=False"])
    train.main(TINY + ["--max_iters=6", "--out_dir=weight/a", "--decay_lr=False", "--init_from=resume",
                       "--learning_rate=1e-3", "--weight_decay=0.05"])
    lrs = {r["iter"]: r["lr"] for r in read_log("weight/a") if "lr" in r}
    assert lrs[4] == pytest.approx(3e-3) and lrs[5] == lrs[6] == pytest.approx(1e-3)
    ckpt = load_checkpoint("weight/a")
    assert ckpt["optimizer"][0]["param_groups"][0]["weight_decay"] == 0.05
    assert json.load(open("weight/a/config.json"))["learning_rate"] == 1e-3


# ----------------------------------------------------------------------------- loss over targets

def make_answer_dataset(root, n=48, vocab=30, seed=0):
    """Examples whose answers (mask 1) are 1 to 40 tokens long, so micro-batches hold very
    different numbers of targets."""
    rng = np.random.default_rng(seed)
    tok = VocabTokenizer([f"t{i}" for i in range(vocab)])
    folder = os.path.join(root, "data", "answers")
    for split in ("train", "val"):
        w = ExampleWriter(folder, split, vocab, with_mask=True)
        for i in range(n):
            prompt, answer = rng.integers(3, 12), 1 + (i * 7) % 40
            ids = rng.integers(0, vocab, size=prompt + answer)
            w.add(ids, [0] * prompt + [1] * answer)
        w.close()
    save_meta(folder, tok.to_meta())


ANSWERS = ["--dataset=answers", "--device=cpu", "--block_size=64", "--n_layer=2", "--n_head=2",
           "--n_embd=32", "--eval_iters=2", "--log_interval=1", "--warmup_iters=0",
           "--learning_rate=1e-3", "--eval_interval=100", "--max_iters=3", "--dropout=0.0"]


def test_micro_batching_does_not_change_the_step(tmp_path, monkeypatch):
    """batch 8 x 1 == 4 x 2 == 2 x 4: the loss is summed over every target of the step and
    divided by their number, so logged losses and weights agree (the old per-micro-batch mean
    gave 3.8236 / 3.8181 / 3.8184 at iteration 1)."""
    monkeypatch.chdir(tmp_path)
    make_answer_dataset(tmp_path)
    runs = {(8, 1): "a", (4, 2): "b", (2, 4): "c"}
    for (batch, accum), name in runs.items():
        train.main(ANSWERS + [f"--batch_size={batch}", f"--gradient_accumulation_steps={accum}",
                              f"--out_dir=weight/{name}"])
    losses = {name: [loss for _, loss in step_losses(f"weight/{name}")] for name in runs.values()}
    for name in "bc":
        assert np.allclose(losses[name], losses["a"], rtol=1e-6, atol=0), (name, losses)
        a, b = weights("weight/a"), weights(f"weight/{name}")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_two_processes_of_4_equal_one_of_8(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_answer_dataset(tmp_path)
    train.main(ANSWERS + ["--batch_size=8", "--out_dir=weight/one"])
    from test_ddp import torchrun
    r = torchrun(*ANSWERS, "--batch_size=4", "--gradient_accumulation_steps=2", "--out_dir=weight/two")
    assert r.returncode == 0, r.stderr[-3000:]
    a = [loss for _, loss in step_losses("weight/one")]
    b = [loss for _, loss in step_losses("weight/two")]
    assert np.allclose(a, b, rtol=1e-6, atol=0), (a, b)
    wa, wb = weights("weight/one"), weights("weight/two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_an_empty_micro_batch_adds_nothing():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 20, (2, 8))
    y = torch.full((2, 8), -1)
    total, _ = train.Objective(model, loss_only=False)(x, y)
    sparse, _ = train.Objective(model, loss_only=True)(x, y)
    assert total.item() == 0.0 and sparse.item() == 0.0


# ----------------------------------------------------------------------------- shared streams

def test_ranks_split_one_window_stream(tmp_path):
    """2 processes resuming at position P read exactly the windows 1 process would read from
    P, split between them: nothing twice, nothing skipped."""
    make_char_dataset(tmp_path)
    data = str(tmp_path / "data" / "tiny")
    one = TokenWindows(data, "train", 16, 4, 65, seed=7)
    one.load_state_dict({"pos": 12})
    single = torch.cat([one.get_batch()[0] for _ in range(2)])  # 8 windows
    ranks = [TokenWindows(data, "train", 16, 4, 65, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict({"pos": 12})
    both = torch.cat([loader.get_batch()[0] for loader in ranks])
    assert torch.equal(single, both)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict() == {"pos": 20}


def test_ranks_split_one_example_order(tmp_path):
    make_answer_dataset(tmp_path)
    data = str(tmp_path / "data" / "answers")
    one = Examples(data, "train", 64, 8, 30, seed=3)
    ranks = [Examples(data, "train", 64, 4, 30, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):  # crosses the end of an epoch (48 examples, 8 per step)
        x1 = one.get_batch()[0]
        x2 = [loader.get_batch()[0] for loader in ranks]
        assert torch.equal(x1[:4, :x2[0].size(1)], x2[0]) and torch.equal(x1[4:, :x2[1].size(1)], x2[1])
    assert ranks[0].state_dict() == one.state_dict() == {"epoch": 1, "pos": 8}


def test_group_by_length_sorts_each_step_not_the_epoch(tmp_path):
    """group_by_length: a step holds the same examples as without it, sorted by length, so its
    micro-batches (and ranks) pad far less; the order does not depend on how the step is split."""
    make_answer_dataset(tmp_path, n=96)
    data = str(tmp_path / "data" / "answers")
    plain = Examples(data, "train", 64, 4, 30, seed=3, accum=2)
    grouped = Examples(data, "train", 64, 4, 30, seed=3, accum=2, group_by_length=True)
    lengths = grouped.ends - grouped.starts
    steps, plain_steps = np.split(grouped.order, 12), np.split(plain.order, 12)
    assert all(sorted(a) == sorted(b) for a, b in zip(steps, plain_steps))
    assert all(np.all(np.diff(lengths[s]) >= 0) for s in steps)

    def padding(order):  # padded positions when each 4-example micro-batch pads to its longest
        return sum(int(lengths[m].max()) * len(m) - int(lengths[m].sum()) for m in np.split(order, 24))
    assert padding(grouped.order) < 0.7 * padding(plain.order)
    ranks = Examples(data, "train", 64, 4, 30, seed=3, rank=1, world_size=2, group_by_length=True)
    assert np.array_equal(ranks.order, grouped.order)
    micro = [grouped.get_batch()[0] for _ in range(2)]  # one step: the shorter half, then the longer
    assert micro[0].size(1) <= micro[1].size(1)


def test_resume_on_two_processes_from_a_one_process_checkpoint(tiny_data):
    train.main(TINY + ["--max_iters=4", "--out_dir=weight/a", "--batch_size=4"])
    from test_ddp import torchrun
    r = torchrun(*TINY, "--max_iters=6", "--out_dir=weight/a", "--batch_size=2", "--init_from=resume",
                 "--gradient_accumulation_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 1 processes and this run has 2" in r.stdout
    ckpt = load_checkpoint("weight/a")
    assert ckpt["iter_num"] == 6 and ckpt["loader"] == {"pos": 24} and ckpt["world_size"] == 2


# ----------------------------------------------------------------------------- checkpoint policy

@pytest.mark.parametrize("always", [True, False])
def test_checkpoint_policy(tiny_data, monkeypatch, always):
    """ckpt.pt: the latest state, at every eval with always_save_checkpoint, else at the end;
    best.pt: the weights of the lowest val loss, whose value best_val_loss reports."""
    saved = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",
                        lambda path, ckpt: (saved.append((os.path.basename(path), ckpt["iter_num"])), real(path, ckpt)))
    train.main(TINY + ["--max_iters=20", "--eval_interval=5", "--out_dir=weight/a",
                       f"--always_save_checkpoint={always}"])
    latest = [it for name, it in saved if name == "ckpt.pt"]
    assert latest == ([5, 10, 15, 20] if always else [20])
    evals = {r["iter"]: r["val_loss"] for r in read_log("weight/a") if "val_loss" in r}
    best = load_checkpoint("weight/a/best.pt")
    best_iter = min((it for it in evals if it > 0), key=lambda it: evals[it])
    assert best["iter_num"] == best_iter and best["best_val_loss"] == evals[best_iter]
    assert "optimizer" not in best and load_checkpoint("weight/a")["iter_num"] == 20
    model, ckpt = checkpoint.load_model("weight/a")  # a run folder means its best weights
    assert ckpt["iter_num"] == best_iter


def test_float16_resume_keeps_the_grad_scaler(tiny_data):
    """float16 (autocast + GradScaler, on the CPU here): the scaler's scale and growth counter
    travel in ckpt.pt, so a resumed run scales its losses as an uninterrupted one does."""
    args = TINY + ["--dtype=float16", "--eval_interval=100", "--lr_decay_iters=6"]
    run_script("train.py", *args, "--max_iters=6", "--out_dir=weight/full")
    run_script("train.py", *args, "--max_iters=3", "--out_dir=weight/split")
    assert load_checkpoint("weight/split")["scaler"]["_growth_tracker"] == 3
    run_script("train.py", *args, "--max_iters=6", "--out_dir=weight/split", "--init_from=resume")
    assert step_losses("weight/split") == step_losses("weight/full")
    assert load_checkpoint("weight/split")["scaler"] == load_checkpoint("weight/full")["scaler"]
