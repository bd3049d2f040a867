"""Nothing lost: atomic checkpoints, signals, non-finite losses, broken checkpoint files."""
import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import ROOT, TINY, read_log
def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def trainer_process(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_iters(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    return [r["iter"] for r in read_log(out_dir) if "lr" in r] if os.path.exists(path) else []


def test_sigterm_finishes_step_saves_and_exits_zero(tiny_data):
    p = trainer_process("--max_iters=100000", "--eval_interval=100000", "--out_dir=weight/a")
    assert wait_for(lambda: len(log_iters("weight/a")) >= 3), p.communicate()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stopped by SIGTERM" in out and "--init_from=resume" in out
    assert "SIGTERM: stopping after this step, then saving ckpt.pt" in out  # said at once
    ckpt = load_checkpoint("weight/a")
    assert ckpt["iter_num"] >= 3
    summary = train.main(TINY + ["--out_dir=weight/a", "--init_from=resume",
                                 f"--max_iters={ckpt['iter_num'] + 2}"])
    assert summary["iters"] == ckpt["iter_num"] + 2


SLOW_SAVE = """
import sys, time, torch
sys.path.insert(0, {root!r})
import checkpoint
checkpoint.save_checkpoint({path!r}, {{"model": {{"w": torch.ones(3)}}, "model_config": {{}}}})
def slow_save(obj, f):
    f.write(b"x" * 4096); f.flush()
    print("saving", flush=True)
    time.sleep(60)
checkpoint.torch.save = slow_save
checkpoint.save_checkpoint({path!r}, {{"model": {{"w": torch.zeros(3)}}, "model_config": {{}}}})
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    p = subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(root=ROOT, path=path)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "saving"
    p.kill()  # SIGKILL in the middle of writing the new checkpoint
    p.wait()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}})

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left.*previous file there is untouched"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"model": {"w": torch.ones(1000)}, "model_config": {}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(path))
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a danlu checkpoint"):
        load_checkpoint(str(path))
    path.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable danlu checkpoint"):
        load_checkpoint(str(path))
    torch.save({"model": {}, "model_config": {}, "when": datetime.date(2020, 1, 1)}, path)  # an arbitrary pickled object
    with pytest.raises(CheckpointError, match="not a readable danlu checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing"))


class NaNOnSteps(train.Objective):
    """Returns a NaN training loss on the training forward passes listed in bad_calls."""
    bad_calls: set = set()
    calls = 0

    def forward(self, x, y, w=None):
        loss, aux = super().forward(x, y, w)
        if self.model.training:
            NaNOnSteps.calls += 1
            if NaNOnSteps.calls in NaNOnSteps.bad_calls:
                loss = loss * float("nan")
        return loss, aux


def test_nonfinite_loss_skips_step_then_stops(tiny_data, monkeypatch):
    monkeypatch.setattr(train, "Objective", NaNOnSteps)
    NaNOnSteps.calls, NaNOnSteps.bad_calls = 0, {3, 4}
    summary = train.main(TINY + ["--max_iters=6", "--out_dir=weight/a"])
    assert summary["iters"] == 6
    events = [r for r in read_log("weight/a") if r.get("event") == "nonfinite_loss"]
    assert [r["iter"] for r in events] == [2, 2]
    assert all(torch.isfinite(v).all() for v in load_checkpoint("weight/a")["model"].values())

    NaNOnSteps.calls, NaNOnSteps.bad_calls = 0, set(range(4, 100))
    with pytest.raises(RuntimeError, match=r"3 non-finite losses in a row at iter 3.*ckpt.pt from iter 2 is kept"):
        train.main(TINY + ["--max_iters=50", "--eval_interval=2", "--out_dir=weight/b", "--max_nonfinite=3"])
    assert load_checkpoint("weight/b")["iter_num"] == 2
