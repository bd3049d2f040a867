"""Many processes on CPU (gloo): DDP equals gradient accumulation, and torchrun restarts resume."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from checkpoint import load_checkpoint
from conftest import ROOT, TINY, make_char_dataset, read_log
from data import ExampleWriter
from tokenizer import VocabTokenizer, save_meta

ARGS = ["--dataset=ex", "--device=cpu", "--block_size=16", "--batch_size=2", "--n_layer=2",
        "--n_head=2", "--n_embd=32", "--eval_iters=4", "--log_interval=1", "--warmup_iters=0",
        "--learning_rate=1e-2", "--gradient_accumulation_steps=2", "--dropout=0.0"]


def make_example_dataset(root, n=64, length=17, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    tok = VocabTokenizer([f"t{i}" for i in range(vocab)])
    for split in ("train", "val"):
        w = ExampleWriter(os.path.join(root, "data", "ex"), split, vocab)
        for _ in range(n):
            w.add(rng.integers(0, vocab, size=length))
        w.close()
    save_meta(os.path.join(root, "data", "ex"), tok.to_meta())


def torchrun(*args, nproc=2, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *extra, os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_two_processes_equal_one_process_accumulating(tmp_path, monkeypatch):
    """One optimizer step of 2 gloo processes x 1 micro-batch == 1 process x 2 micro-batches
    over the same two batches; evaluation and checkpointing happen once, on rank 0. (Over more
    steps Adam amplifies float rounding differences, so one step is the exact comparison.)"""
    monkeypatch.chdir(tmp_path)
    make_example_dataset(tmp_path)
    train.main(ARGS + ["--max_iters=1", "--eval_interval=1", "--out_dir=weight/single"])
    r = torchrun(*ARGS, "--max_iters=1", "--eval_interval=1", "--out_dir=weight/ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint("weight/single")
    b = load_checkpoint("weight/ddp")
    assert b["iter_num"] == 1 and b["world_size"] == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    val = [[r["val_loss"] for r in read_log(d) if "val_loss" in r] for d in ("weight/single", "weight/ddp")]
    assert np.allclose(val[0], val[1], atol=1e-5)
    assert r.stdout.count("done: 1 iters") == 1  # only rank 0 prints


def test_accumulation_must_divide_by_world_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_example_dataset(tmp_path)
    r = torchrun(*ARGS, "--max_iters=1", "--gradient_accumulation_steps=3", "--out_dir=weight/x")
    assert r.returncode != 0 and "multiple of the number of processes (2)" in r.stderr


@pytest.mark.slow
def test_torchrun_restart_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    """A few hundred iterations on 2 processes; kill a worker mid-run: torchrun --max_restarts
    starts both again and init_from=auto resumes from the last checkpoint. Marked slow: on a
    loaded 2-core machine gloo's reconnection after the restart can time out (a retry limit
    inside gloo), so it runs with `pytest -m slow` rather than in every CI run."""
    monkeypatch.chdir(tmp_path)
    make_char_dataset(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max_restarts=1", os.path.join(ROOT, "train.py"), *TINY, "--init_from=auto",
           "--max_iters=300", "--eval_interval=10", "--out_dir=weight/r",
           "--gradient_accumulation_steps=2"]
    # output to files, not pipes: a full pipe nobody reads would block the workers
    with open("out.txt", "w") as out, open("err.txt", "w") as err:
        agent = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
    try:
        assert wait_for(lambda: os.path.exists("weight/r/ckpt.pt"), 120), "no checkpoint appeared"
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, f"expected 2 workers, found {workers}"
        os.kill(int(workers[-1]), signal.SIGKILL)
        agent.wait(timeout=240)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)  # never leave a hung job behind
    out, err = open("out.txt").read(), open("err.txt").read()
    assert agent.returncode == 0, err[-3000:]
    assert "resuming from weight/r/ckpt.pt" in out
    assert load_checkpoint("weight/r")["iter_num"] == 300
    steps = [r["iter"] for r in read_log("weight/r") if "lr" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # no step logged twice after resume


def wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_init_from_auto_starts_fresh_then_resumes(tmp_path, monkeypatch):
    """What a restarted worker relies on: auto starts from scratch without a checkpoint and
    resumes from it when there is one."""
    monkeypatch.chdir(tmp_path)
    make_char_dataset(tmp_path)
    train.main(TINY + ["--init_from=auto", "--max_iters=4", "--out_dir=weight/a"])
    summary = train.main(TINY + ["--init_from=auto", "--max_iters=6", "--out_dir=weight/a"])
    assert summary["iters"] == 6
    assert [r["iter"] for r in read_log("weight/a") if "lr" in r] == [1, 2, 3, 4, 5, 6]


def test_two_processes_train_the_mlp_class_head_with_untied_embeddings(tmp_path, monkeypatch):
    """cls_head = mlp reads the <CLS> state; an untied LM head gets no gradient, so it is frozen
    (DDP stopped with "Expected to have finished reduction" while it was trainable)."""
    monkeypatch.chdir(tmp_path)
    from prepare import tiny_cls
    tiny_cls.main([])
    r = torchrun(os.path.join(ROOT, "config", "tiny_cls_mlp.py"), "--tie_embeddings=False", "--max_iters=2",
                 "--eval_interval=2", "--eval_iters=2", "--gradient_accumulation_steps=2", "--n_layer=1",
                 "--device=cpu", "--out_dir=weight/mlp")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint("weight/mlp")
    assert ckpt["iter_num"] == 2 and ckpt["world_size"] == 2
