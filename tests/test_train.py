"""Training end to end on a tiny char dataset: config, checkpoint, log, exact resume, sampling."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from checkpoint import load_model
from settings import ConfigError, load_config
from conftest import ROOT, TINY, make_char_dataset, read_log
from data import DataError

def test_short_run_writes_checkpoint_log_and_config(tiny_data):
    summary = train.main(TINY + ["--max_iters=20", "--eval_interval=10", "--out_dir=weight/a"])
    assert summary["iters"] == 20
    for name in ("ckpt.pt", "log.jsonl", "config.json", "loss.png"):
        assert os.path.exists(f"weight/a/{name}"), name
    log = read_log("weight/a")
    evals = [r for r in log if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all({"iter", "elapsed_s"} <= set(r) for r in log)
    assert {"train_loss", "lr", "tok_per_s", "mfu"} <= set(log[1])
    ckpt = torch.load("weight/a/ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 20 and ckpt["format_version"] == 3
    assert ckpt["tokenizer"]["kind"] == "char" and ckpt["train_config"]["max_iters"] == 20
    assert json.load(open("weight/a/config.json"))["n_layer"] == 2


def test_save_load_identical_logits(tiny_data):
    train.main(TINY + ["--max_iters=5", "--out_dir=weight/a", "--pos_emb=rope", "--tie_embeddings=False"])
    model, ckpt = load_model("weight/a")
    again, _ = load_model("weight/a/ckpt.pt")
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    assert torch.equal(model(x)[0], again(x)[0])
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in ckpt["model"])


def test_lr_schedule_shapes():
    cfg = load_config(train.TrainConfig, ["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10",
                                          "--max_iters=100"])
    mults = [train.lr_multiplier(i, cfg) for i in range(120)]
    assert mults[0] < mults[5] < mults[10] == pytest.approx(1.0, abs=1e-3)
    assert mults[100] == mults[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(mults[10:100], mults[11:101]))
    cfg.lr_schedule, cfg.cooldown_frac = "wsd", 0.2
    mults = [train.lr_multiplier(i, cfg) for i in range(101)]
    assert mults[50] == mults[79] == 1.0 and 0.1 < mults[90] < 1.0 and mults[100] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- config errors

def test_unknown_key_in_file_and_cli(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("n_layers = 4\n")
    with pytest.raises(ConfigError, match=r"bad\.py.*'n_layers'.*did you mean 'n_layer'"):
        load_config(train.TrainConfig, [str(bad)])
    with pytest.raises(ConfigError, match=r"command line.*'learning_rat'.*'learning_rate'"):
        load_config(train.TrainConfig, ["--learning_rat=1e-3"])


def test_wrong_type_and_computed_values(tmp_path):
    with pytest.raises(ConfigError, match="n_layer = 'four'.*int"):
        load_config(train.TrainConfig, ["--n_layer=four"])
    with pytest.raises(ConfigError, match="compile.*bool"):
        load_config(train.TrainConfig, ["--compile=1"])
    cfg_file = tmp_path / "ok.py"
    cfg_file.write_text("import math\nmax_iters = 300\nlr_decay_iters = max_iters\n"
                        "learning_rate = 1\n_private = 3\n")
    cfg = load_config(train.TrainConfig, [str(cfg_file), "--max_iters=10", "--out_dir=123", "--compile"])
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.out_dir, cfg.compile) == (10, 300, "123", True)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_shipped_configs_load():
    """Every config/*.py loads: dpo.py's (dpo_*) with DPOConfig, rl.py's (rl_*) with RLConfig,
    sft.py's (they name a base) with SFTConfig, the rest with train's."""
    import dpo
    import rl
    import sft
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        if name.endswith(".py"):
            path = os.path.join(ROOT, "config", name)
            is_sft = any(line.startswith("base = ") for line in open(path, encoding="utf-8"))
            cls = (dpo.DPOConfig if name.startswith("dpo_") else rl.RLConfig if name.startswith("rl_")
                   else sft.SFTConfig if is_sft else train.TrainConfig)
            load_config(cls, [path])


# ----------------------------------------------------------------------------- bad data

def test_missing_dataset_names_prepare_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="prepare/shakespeare_char.py"):
        train.main(["--dataset=shakespeare_char", "--device=cpu"])


def test_odd_sized_bin_and_out_of_range_ids(tiny_data):
    with open("data/tiny/train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match="multiple of 2"):
        train.main(TINY + ["--max_iters=1"])
    make_char_dataset(tiny_data)
    np.array([0, 1, 500], dtype=np.uint16).tofile("data/tiny/val.bin")
    with pytest.raises(DataError, match="token id 500.*vocab_size"):
        train.main(TINY + ["--max_iters=1"])


def test_dataset_smaller_than_one_block(tiny_data):
    make_char_dataset(tiny_data, "small", text="abcdefghij" * 3)
    with pytest.raises(DataError, match="fewer than one block"):
        train.main(TINY + ["--dataset=small", "--max_iters=1"])


def test_resume_with_other_model_config_is_refused(tiny_data):
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/a"])
    with pytest.raises(ConfigError, match="n_embd: checkpoint 32 vs config 64"):
        train.main(TINY + ["--max_iters=4", "--out_dir=weight/a", "--init_from=resume", "--n_embd=64"])
    with pytest.raises(ConfigError, match="does not exist"):
        train.main(TINY + ["--max_iters=4", "--out_dir=weight/b", "--init_from=resume"])


# ----------------------------------------------------------------------------- sample.py

def run_sample(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_sample_same_seed_same_text(tiny_data):
    train.main(TINY + ["--max_iters=30", "--out_dir=weight/a"])
    args = ["--out_dir=weight/a", "--start=First", "--max_new_tokens=40", "--device=cpu", "--seed=3"]
    a, b = run_sample(*args), run_sample(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("First") and len(a.stdout) > 40
    assert run_sample(*args[:-1], "--seed=4").stdout != a.stdout
    prompt = tiny_data / "prompt.txt"
    prompt.write_text("All:\n")
    c = run_sample("--out_dir=weight/a", f"--start=FILE:{prompt}", "--max_new_tokens=5", "--num_samples=2")
    assert c.returncode == 0 and c.stdout.count("All:\n") == 2


def test_sample_bad_inputs(tiny_data):
    train.main(TINY + ["--max_iters=1", "--out_dir=weight/a"])
    r = run_sample("--out_dir=weight/a", "--block_size=64")
    assert r.returncode == 1 and "larger than the 32 positions" in r.stderr
    r = run_sample("--out_dir=weight/a", "--start=")
    assert r.returncode == 1 and "prompt is empty" in r.stderr
    r = run_sample("--out_dir=weight/a", "--start=" + "speak " * 20, "--max_new_tokens=3")
    assert r.returncode == 0 and "keeping the last 31" in r.stderr
    r = run_sample("--out_dir=weight/a", "--temprature=0.5")
    assert r.returncode == 1 and "did you mean 'temperature'" in r.stderr


def test_cpu_runtime_keeps_freed_memory_on_glibc():
    """setup_runtime on CPU asks glibc to reuse freed blocks (2x faster steps with a 50k
    vocabulary, see common.keep_freed_memory); elsewhere it changes nothing and says so."""
    import platform
    from runtime import keep_freed_memory
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
    assert keep_freed_memory() is expected  # idempotent: every setup_runtime call may repeat it


def test_the_token_scan_is_kept_and_redone_when_the_bin_changes(tiny_data):
    """check_tokens reads a whole .bin once; later starts read the kept result, unless the
    file changed since (size or modification time)."""
    from data import check_tokens
    check_tokens("data/tiny", "train", 33)
    assert json.load(open("data/tiny/train.bin.max.json"))["max_id"] < 33
    ids = np.fromfile("data/tiny/train.bin", dtype=np.uint16)
    ids[5] = 40
    ids.tofile("data/tiny/train.bin")
    os.utime("data/tiny/train.bin", ns=(1, 1))  # a new mtime even within the clock's resolution
    with pytest.raises(DataError, match="token id 40"):
        check_tokens("data/tiny", "train", 33)
