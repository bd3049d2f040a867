"""Nothing lost, round two: every writer respects what is already in its destination (the one
output policy of files.py); each test here is a case that destroyed a user's files before."""
import json
import os

import pytest

import train
from conftest import TINY, run_script
from files import DestinationError, claim_folder, record_folder
from settings import ConfigError


def test_export_refuses_a_folder_it_did_not_write(tiny_data):
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/a"])
    before = open("weight/a/config.json").read()
    r = run_script("export.py", "--out_dir=weight/a", "--format=hf", "--dest=weight/a", check=False)
    assert r.returncode == 1 and "holds a training run" in r.stderr and "--overwrite" in r.stderr
    assert open("weight/a/config.json").read() == before  # the run's training record is intact
    os.makedirs("mine")
    for name in ("README.md", "config.json", "tokenizer.json"):
        open(f"mine/{name}", "w").write("the user's own\n")
    r = run_script("export.py", "--out_dir=weight/a", "--format=hf", "--dest=mine", check=False)
    assert r.returncode == 1 and "files this command did not write" in r.stderr
    assert all(open(f"mine/{n}").read() == "the user's own\n" for n in os.listdir("mine"))
    run_script("export.py", "--out_dir=weight/a", "--format=hf", "--dest=hf")
    run_script("export.py", "--out_dir=weight/a", "--format=hf", "--dest=hf")  # its own output: again is fine
    r = run_script("export.py", "--out_dir=weight/a", "--format=hf", "--dest=mine", "--overwrite")
    assert "--overwrite" in r.stderr and os.path.exists("mine/model.safetensors")


def test_merge_refuses_another_run(tiny_data):
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/a"])
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/b"])
    with pytest.raises(DestinationError, match="weight/b holds a training run"):
        claim_folder("weight/b", "export.py --merge")
    with pytest.raises(DestinationError, match="is a file"):
        claim_folder("weight/b/ckpt.pt", "export.py --merge")


def test_train_does_not_replace_a_run_unless_asked(tiny_data, capsys):
    train.main(TINY + ["--max_iters=4", "--out_dir=weight/a", "--eval_interval=2"])
    with pytest.raises(ConfigError, match="weight/a holds a run .*--overwrite") as e:
        train.main(TINY + ["--max_iters=2", "--out_dir=weight/a", "--init_from=scratch"])
    assert "init_from=scratch" not in str(e.value)  # no advice that destroys data
    summary = train.main(TINY + ["--max_iters=6", "--out_dir=weight/a"])  # the default resumes it
    assert summary["iters"] == 6 and "resuming from weight/a/ckpt.pt at iter 4" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="different model config"):
        train.main(TINY + ["--max_iters=8", "--out_dir=weight/a", "--n_layer=3"])  # incompatible: refused
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/a", "--init_from=scratch", "--overwrite"])
    assert "replaces the one in weight/a" in capsys.readouterr().out


def test_record_folder_lets_the_same_command_write_again(tmp_path):
    dest = tmp_path / "out"
    claim_folder(str(dest), "x")
    dest.mkdir()
    (dest / "a.json").write_text("{}")
    record_folder(str(dest), "x")
    claim_folder(str(dest), "x")
    with pytest.raises(DestinationError):
        claim_folder(str(dest), "y")
    (dest / "user.txt").write_text("mine")
    with pytest.raises(DestinationError, match="user.txt"):
        claim_folder(str(dest), "x")


def test_eval_never_overwrites_its_input_or_another_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("gen.jsonl", "w") as f:
        f.write(json.dumps({"reference": "a b c", "reply": "a b c"}) + "\n")
    r = run_script("eval.py", "--score=gen.jsonl", "--out=gen.jsonl", check=False)
    assert r.returncode == 1 and "is an input" in r.stderr and open("gen.jsonl").read().startswith("{")
    open("notes.json", "w").write("mine")
    r = run_script("eval.py", "--score=gen.jsonl", "--out=notes.json", check=False)
    assert r.returncode == 1 and "exists" in r.stderr and open("notes.json").read() == "mine"


def test_the_tokenizer_trainer_keeps_a_good_tokenizer(tmp_path, monkeypatch):
    pytest.importorskip("rustbpe")
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/tokenizers")
    open("data/tokenizers/zh.json", "w").write('{"kind": "bpe"}')
    open("empty.txt", "w").close()
    r = run_script("prepare/tokenizer.py", "--input", "empty.txt", "--vocab_size", "300", "--name", "zh", check=False)
    assert r.returncode == 1 and "exists" in r.stderr and open("data/tokenizers/zh.json").read() == '{"kind": "bpe"}'
    r = run_script("prepare/tokenizer.py", "--input", "empty.txt", "--vocab_size", "300", "--name", "zh2", check=False)
    assert r.returncode == 1 and "taught no merge" in r.stderr and not os.path.exists("data/tokenizers/zh2.json")


def test_a_tokenizer_name_that_does_not_exist_says_what_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open("a.txt", "w").write("hello world\n" * 50)
    r = run_script("prepare/text.py", "--input", "a.txt", "--name", "t", "--tokenizer", "nosuchtok", check=False)
    assert r.returncode == 1 and "data/tokenizers/nosuchtok.json does not exist" in r.stderr
    assert not os.path.exists("data/t")
