"""The first hour of a new user: --help on every entry point (from the settings, so it cannot
drift), one dtype line that a resumed run keeps, no foreign warnings in a bf16 run, a thread count
that fits the machine, Ctrl-C as one line, and what the start of a run prints."""
import os
import signal
import subprocess
import sys
import time

import pytest

import runtime
import settings
import train
from conftest import ROOT, TINY, run_script

ENTRY_POINTS = ["train.py", "sft.py", "dpo.py", "sample.py", "eval.py", "export.py", "serve.py", "bench.py"]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_entry_point_has_help(script):
    r = run_script(script, "--help")
    assert r.stdout.startswith(f"usage: python {script} [config/<name>.py]") and "config/" in r.stdout
    assert "Traceback" not in r.stderr


def test_help_lists_each_key_with_default_valid_values_and_meaning():
    text = settings.help_text(train.TrainConfig, "train.py")
    line = next(x for x in text.splitlines() if x.strip().startswith("--learning_rate="))
    assert "0.0006" in line and "[> 0.0]" in line
    line = next(x for x in text.splitlines() if x.strip().startswith("--lr_schedule="))
    assert "cosine | wsd" in line and "wsd: warmup, stable, linear decay" in line
    for group in ("model:", "data and run folder:", "optimizer and schedule:", "system:"):
        assert f"\n{group}\n" in text, group
    assert "--lora_rank=0" in text and "--n_layer=12" in text  # LoRA's and the model's keys too


def test_a_run_prints_what_differs_from_the_defaults(tiny_data, capsys):
    train.main(TINY + ["--max_iters=1", "--out_dir=weight/a"])
    out = capsys.readouterr().out
    assert "  n_layer = 2\n" in out and "  max_iters = 1\n" in out and "  beta1" not in out
    assert out.count("dtype float32") == 1  # said once, after it is decided


def test_a_resumed_run_keeps_its_dtype(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("a CPU with bf16", True))
    monkeypatch.setattr(runtime, "probe_step_seconds", lambda *a, **k: pytest.fail("measured on resume"))
    from model import GPT, GPTConfig
    narrow = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    run = runtime.resolve_cpu_dtype(runtime.setup_runtime("cpu", "auto"), narrow, 2, 8, "auto", previous="bfloat16")
    assert run.dtype == "bfloat16"  # a narrow model alone would be float32: the checkpoint's wins


def test_a_bf16_run_prints_no_foreign_warnings(tiny_data):
    r = run_script("train.py", *TINY, "--max_iters=2", "--out_dir=weight/b", "--dtype=bfloat16", "--norm=rmsnorm",
                   "--qk_norm=True")
    assert "Warning" not in r.stderr and "warn" not in r.stdout.lower(), r.stderr[-2000:]


def test_threads_fit_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.pick_threads(3) == (3, "--threads")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 1.2)
    n, why = runtime.pick_threads(0)
    assert n == 1 and "2 cores, 1.2 busy" in why  # one core is busy: one thread
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0.1)
    assert runtime.pick_threads(0)[0] == 2
    monkeypatch.undo()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 0 <= runtime.busy_cores(0.05) <= (os.cpu_count() or 1) + 0.01  # the real look at /proc/stat
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.pick_threads(0) == (1, "OMP_NUM_THREADS")


def test_ctrl_c_in_an_entry_point_is_one_line_and_exit_130(tiny_data):
    run_script("train.py", *TINY, "--max_iters=2", "--out_dir=weight/c")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir=weight/c", "--start=a",
                          "--max_new_tokens=1000000", "--device=cpu"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # loading and sampling
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
