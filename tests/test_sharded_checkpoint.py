"""Sharded checkpoints (torch.distributed.checkpoint, sharded_checkpoint = True under FSDP), on
CPU (gloo): exact resume on the same number of processes and resharded resume on another
(2 -> 1, 2 -> 4, 1 -> 2); the one consolidation every reader goes through; a save killed at any
moment leaves the previous checkpoint whole; a crafted metadata file runs no code; and a lost
node: the survivor fails within dist_timeout + join_timeout and both launchers resume."""
import dataclasses
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpoint import (CheckpointError, checkpoint_path, is_run, load_checkpoint, load_model, save_checkpoint,
                        save_sharded, sibling, weights_path)
from conftest import ROOT, read_log
from model import GPT, GPTConfig
from settings import ConfigError
from test_ddp import make_example_dataset
from test_fsdp import FSDP, free_port, losses, run

pytest.importorskip("torch.distributed.checkpoint")
SHARDED = FSDP[:-1] + ["--parallel=fsdp", "--sharded_checkpoint"]  # and --max_iters=N


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_example_dataset(tmp_path)
    return tmp_path


def test_sharded_resume_exact_and_on_other_process_counts(data, fsdp_reference):
    """The uninterrupted run to compare with is fsdp_reference: the same 6 steps, saved whole
    (where a checkpoint goes changes no step)."""
    r = run(*SHARDED, "--max_iters=3", "--out_dir=weight/split", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir("weight/split/ckpt.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "danlu.pt"]
    assert not os.path.exists("weight/split/ckpt.pt")
    for other in ("to1", "to4"):
        shutil.copytree("weight/split", f"weight/{other}")
    whole = losses(fsdp_reference)
    for out_dir, nproc in (("split", 2), ("to1", 1), ("to4", 4)):
        r = run(*SHARDED, "--max_iters=6", f"--out_dir=weight/{out_dir}", nproc=nproc)
        assert r.returncode == 0, (out_dir, r.stderr[-3000:])
        assert load_checkpoint(f"weight/{out_dir}")["world_size"] == nproc
    assert losses("weight/split") == whole  # the same processes: bit for bit
    for out_dir in ("to1", "to4"):  # another count adds the micro-batches in another order: rounding only
        assert np.allclose(losses(f"weight/{out_dir}"), whole, rtol=1e-6), out_dir
    r = run(*SHARDED, "--max_iters=3", "--out_dir=weight/from1", nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(*SHARDED, "--max_iters=6", "--out_dir=weight/from1", nproc=2)  # 1 -> 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.allclose(losses("weight/from1"), whole, rtol=1e-6)
    # the one consolidation: the sharded weights, whole, are those the same steps gather into ckpt.pt
    gathered, sharded = load_checkpoint(fsdp_reference), load_checkpoint("weight/split")
    assert sharded["iter_num"] == 6 and sharded["parallel"] == "fsdp" and sharded["optimizer"] is None
    assert sharded.keys() >= gathered.keys() - {"optimizer"} and sharded["model"].keys() == gathered["model"].keys()
    for key, value in gathered["model"].items():
        assert torch.equal(sharded["model"][key], value), key
    # every reader (sample, serve, eval, export, sft's base) goes through load_model / weights_path
    assert is_run("weight/split") and weights_path("weight/split") == os.path.join("weight/split", "best.dcp")
    model, ckpt = load_model("weight/split")
    assert isinstance(model, GPT) and ckpt["iter_num"] == 6


def test_sharded_checkpoint_needs_fsdp():
    from train import TrainConfig
    with pytest.raises(ConfigError, match="parallel = 'fsdp'"):
        TrainConfig(sharded_checkpoint=True)


# ----------------------------------------------------------------------------- one process, no torchrun

def tiny_state(fill: float, n_embd: int = 32) -> tuple[dict, dict]:
    """(shards, run_state) of a small model whose every weight is `fill`."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=n_embd, block_size=8, vocab_size=64))
    state = {k: torch.full_like(v, fill) for k, v in model.state_dict().items()}
    return {"model": state}, {"model_config": dataclasses.asdict(model.config), "iter_num": int(fill), "optimizer": None}


def fills(path: str) -> set:
    return {float(v.float().mean()) for v in load_checkpoint(path)["model"].values()}


def die(*args):
    raise KeyboardInterrupt("the process stops here")


def test_killed_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.dcp")
    save_sharded(path, *tiny_state(1.0), master=True)
    # stopped after the shards, before danlu.pt (the mark of a whole folder): the old one is read
    monkeypatch.setattr("checkpoint.save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(path, *tiny_state(2.0), master=True)
    monkeypatch.undo()
    assert os.path.isdir(sibling(path, "tmp")) and fills(str(tmp_path)) == {1.0}
    # killed between its two renames: the previous folder, moved aside, is read
    real_rename = os.rename

    def rename(a, b):
        if b == path:  # the new folder's rename in, after the previous one was moved aside
            die()
        real_rename(a, b)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(path, *tiny_state(3.0), master=True)
    monkeypatch.undo()
    assert not os.path.exists(path) and checkpoint_path(str(tmp_path)) == sibling(path, "old")
    assert fills(str(tmp_path)) == {1.0} and is_run(str(tmp_path))
    save_sharded(path, *tiny_state(4.0), master=True)  # the next save cleans both leftovers
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"] and fills(str(tmp_path)) == {4.0}
    # a run that switches format keeps one checkpoint: the newer replaces the older
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": tiny_state(5.0)[0]["model"], **tiny_state(5.0)[1]})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    save_sharded(path, *tiny_state(6.0), master=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"] and fills(str(tmp_path)) == {6.0}


SAVER = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_sharded_checkpoint import tiny_state
from checkpoint import save_sharded
i = 1
while True:
    save_sharded({path!r}, *tiny_state(float(i), n_embd=256), master=True)
    print(i, flush=True)
    i += 1
"""


def test_sigkill_during_sharded_saves(tmp_path):
    """A process saving again and again, SIGKILLed at three moments: the checkpoint always loads,
    and holds one save whole (every weight the same number), never a mix of two."""
    path = str(tmp_path / "ckpt.dcp")
    code = SAVER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), path=path)
    for delay in (0.0, 0.13, 0.29):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "1", "the saving process failed"  # its first save is in place
        time.sleep(delay)
        p.kill()
        p.wait()
        got = fills(str(tmp_path))
        assert len(got) == 1 and min(got) >= 1.0, got


def test_crafted_metadata_runs_no_code(tmp_path):
    path = str(tmp_path / "ckpt.dcp")
    save_sharded(path, *tiny_state(1.0), master=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match="not the metadata of a danlu sharded checkpoint"):
        load_checkpoint(str(tmp_path))
    assert not marker.exists()


# ----------------------------------------------------------------------------- a lost node

def launch(node_rank: int, port: int, max_iters: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
           "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=lost",
           "--max_restarts=1", f"--rdzv_conf=join_timeout=15,is_host={int(node_rank == 0)}",
           os.path.join(ROOT, "train.py"), *SHARDED,
           f"--max_iters={max_iters}", "--eval_interval=5", "--dist_timeout=10", "--out_dir=weight/nodes"]
    # is_host: node 0 holds the rendezvous store, as the machine named in --rdzv_endpoint does on a
    # real cluster. On loopback either launcher could bind it first, and a survivor whose store
    # lives in the frozen node waits out the store's read_timeout (60 s) before anything fails.
    # output to files, not pipes: a full pipe nobody reads would block the processes
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def saved_iter(out_dir: str) -> int:
    """The iteration of out_dir's checkpoint; -1 while there is none (or a save is swapping it in)."""
    try:
        return load_checkpoint(out_dir)["iter_num"] if checkpoint_path(out_dir) else -1
    except CheckpointError:
        return -1


def stop(p: subprocess.Popen, sig) -> None:
    """sig to a launcher and its workers (torchrun starts them in sessions of their own), as
    when its machine goes."""
    workers = []
    for stat in os.listdir("/proc"):
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat.isdigit() and int(fields[1]) == p.pid:  # its parent is the launcher
            workers.append(int(stat))
    for pid in [p.pid, *workers]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP/sessions of Linux stand for a lost machine")
def test_lost_node_fails_the_survivor_then_both_resume(data):
    """Two launchers (two "nodes" on loopback) train; node 1 freezes (SIGSTOP to its launcher and
    worker: a machine gone without closing its connections, which no error reports). The
    survivor's collective times out after dist_timeout, torchrun restarts it once and its
    rendezvous gives up after join_timeout: it exits with an error, not hanging. Both launchers
    started again resume from the last sharded checkpoint."""
    logs = [open(data / f"node{i}.log", "w+") for i in (0, 1)]
    port = free_port()
    nodes = [launch(i, port, 100000, logs[i]) for i in (0, 1)]
    try:
        deadline = time.time() + 120
        while saved_iter("weight/nodes") < 5:
            assert time.time() < deadline and all(p.poll() is None for p in nodes), "no checkpoint was written"
            time.sleep(0.5)
        stop(nodes[1], signal.SIGSTOP)
        lost = time.time()
        rc = nodes[0].wait(timeout=90)
        waited = time.time() - lost
    finally:
        for p in nodes:
            stop(p, signal.SIGKILL)
            p.wait()
    logs[0].seek(0)
    survivor = logs[0].read()
    assert rc != 0 and "Timed out" in survivor and "RendezvousTimeoutError" in survivor, survivor[-3000:]
    print(f"the survivor exited {waited:.0f} s after node 1 froze")
    assert waited < 60, waited  # 10 s collective + 15 s rendezvous + a restart, not the 30 minutes of torch's default
    saved = load_checkpoint("weight/nodes")["iter_num"]
    port = free_port()
    nodes = [launch(i, port, saved + 2, logs[i]) for i in (0, 1)]
    assert [p.wait(timeout=120) for p in nodes] == [0, 0]
    records = [r for r in read_log("weight/nodes") if "lr" in r]
    assert load_checkpoint("weight/nodes")["iter_num"] == saved + 2 and records[-1]["iter"] == saved + 2
