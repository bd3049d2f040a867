"""Every bad input refused with one line naming the key, file or line and the fix, and nothing
the user had lost (issue "Nothing lost": a hostile new user's tries)."""
import json
import os

import pytest
import torch

import sample
import sft
import train
from checkpoint import load_checkpoint
from settings import ConfigError, load_config
from conftest import TINY, read_log, run_script
from data import DataError
# ----------------------------------------------------------------------------- data lost

def test_a_diverging_run_never_saves_what_it_cannot_use(tiny_data):
    """lr 1e30 makes the first update overflow the model: the next evaluation is NaN. Nothing
    is saved over the last good checkpoint, the message says what is on disk, log.jsonl stays
    valid JSON (NaN written as null) with one record per evaluation."""
    args = TINY + ["--warmup_iters=0", "--eval_interval=1", "--max_iters=20", "--out_dir=weight/d"]
    with pytest.raises(RuntimeError, match=r"val loss is nan at iter 1.*Nothing was saved; no checkpoint was written"):
        train.main(args + ["--learning_rate=1e30"])
    assert not os.path.exists("weight/d/ckpt.pt") and not os.path.exists("weight/d/best.pt")
    with open("weight/d/log.jsonl") as f:
        records = [json.loads(line) for line in f]  # strict JSON: NaN would not parse back as null
    evals = [r["iter"] for r in records if "val_loss" in r]
    assert evals == sorted(set(evals)) and records[-1]["val_loss"] is None
    # with a good checkpoint on disk, a blow-up keeps it and says which iteration it holds
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/g"])
    with pytest.raises(RuntimeError, match=r"ckpt.pt from iter 2 is kept"):
        train.main(TINY + ["--max_iters=20", "--out_dir=weight/g", "--init_from=resume",
                           "--learning_rate=1e30", "--warmup_iters=0", "--eval_interval=1"])
    ckpt = load_checkpoint("weight/g")
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_refused_resume_leaves_config_json_alone(tiny_data):
    train.main(TINY + ["--max_iters=2", "--out_dir=weight/a"])
    before = open("weight/a/config.json").read()
    with pytest.raises(ConfigError, match="different model config"):
        train.main(TINY + ["--max_iters=4", "--out_dir=weight/a", "--init_from=resume", "--n_layer=3"])
    assert open("weight/a/config.json").read() == before


def test_a_killed_save_leaves_no_temp_file_behind(tmp_path):
    from checkpoint import save_checkpoint
    stale = tmp_path / ".ckpt.pt.999999.tmp"  # a writer killed with -9 (that pid is gone)
    stale.write_bytes(b"x" * 1000)
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": {}, "model_config": {}})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- config values

BAD_TRAIN = [
    ("--lr_schedule=wsdd", "command line: lr_schedule = 'wsdd': choose one of cosine, wsd"),
    ("--eval_iters=0", "eval_iters = 0: must be >= 1"),
    ("--max_iters=-1", "max_iters = -1: must be >= 1"),
    ("--n_embd=0", "n_embd = 0: must be >= 1"),
    ("--n_layer=-2", "n_layer = -2: must be >= 1"),
    ("--n_head=0", "n_head = 0: must be >= 1"),
    ("--n_kv_head=-1", "n_kv_head = -1: must be >= 0"),
    ("--batch_size=0", "batch_size = 0: must be >= 1"),
    ("--block_size=0", "block_size = 0: must be >= 1"),
    ("--learning_rate=0", "learning_rate = 0.0: must be > 0.0"),
    ("--eval_interval=0", "eval_interval = 0: must be >= 1"),
    ("--log_interval=0", "log_interval = 0: must be >= 1"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps = 0: must be >= 1"),
    ("--prompt_loss_weight=2", "prompt_loss_weight = 2.0: must be >= 0.0 and <= 1.0"),
    ("--dropout=1.5", "dropout = 1.5: must be >= 0.0 and < 1.0"),
    ("--min_lr=1e30", "min_lr = 1e+30 is above learning_rate"),
    ("--dtype=fp8", "dtype = 'fp8': choose one of auto, float32, bfloat16, float16"),
]


BAD_SAMPLE = [
    ("--num_samples=0", "num_samples = 0: must be >= 1"),
    ("--max_new_tokens=-5", "max_new_tokens = -5: must be >= 1"),
    ("--temperature=-1", "temperature = -1.0: must be >= 0.0"),
    ("--temperature=1e999", "temperature = inf: must be a finite number"),
    ("--top_k=-5", "top_k = -5: must be >= 0"),
    ("--top_p=0", "top_p = 0.0: must be > 0.0"),
    ("--block_size=-4", "block_size = -4: must be >= 0"),
    ("--split=test", "split = 'test': choose one of train, val"),
]


@pytest.mark.parametrize("cls,arg,message", [(train.TrainConfig, *case) for case in BAD_TRAIN]
                         + [(sample.SampleConfig, *case) for case in BAD_SAMPLE])
def test_values_out_of_range(cls, arg, message):
    with pytest.raises(ConfigError) as e:
        load_config(cls, [arg])
    assert message in str(e.value)


def test_config_file_mistakes_name_the_file_and_line(tmp_path):
    for text, message in (("n_layer = 2\nn_embd = = 32\n", "bad.py:2: invalid syntax"),
                          ("n_layer = nlayers\n", "bad.py:1: NameError: name 'nlayers'"),
                          ("n_layer = -1\n", "bad.py: n_layer = -1: must be >= 1")):
        (tmp_path / "bad.py").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(train.TrainConfig, [str(tmp_path / "bad.py")])
    (tmp_path / "cfg.json").write_text('{"n_layer": 2}')
    with pytest.raises(ConfigError, match="cfg.json: a config file is a flat Python file"):
        load_config(train.TrainConfig, [str(tmp_path / "cfg.json")])


def test_sft_keys_keep_their_ranges_and_out_dir_is_not_the_base(tiny_data):
    with pytest.raises(ConfigError, match="learning_rate = -1.0: must be > 0.0"):
        load_config(sft.SFTConfig, ["--learning_rate=-1"])
    with pytest.raises(ConfigError, match="init_from = 'weight/x': choose one of auto, resume, scratch"):
        load_config(sft.SFTConfig, ["--init_from=weight/x"])


def test_cuda_on_a_machine_without_it(tiny_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_script("train.py", *TINY, "--device=cuda", "--max_iters=1", check=False)
    assert r.returncode == 1 and "device = 'cuda': no CUDA here" in r.stderr and "--device=cpu" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- data files

def test_bad_meta_json_is_named(tiny_data):
    for text, message in (("[]", r"data/tiny/meta.json is not a tokenizer description"),
                          ("{not json", r"data/tiny/meta.json is not valid JSON"),
                          ('{"kind": "char", "vocab_size": 33}', r"data/tiny/meta.json.*'chars'")):
        with open("data/tiny/meta.json", "w") as f:
            f.write(text)
        with pytest.raises((ConfigError, DataError, ValueError), match=message):
            train.main(TINY + ["--max_iters=1"])


def test_a_cut_idx_file_is_refused(tmp_path):
    from test_exact import make_answer_dataset
    from data import Examples
    make_answer_dataset(tmp_path)
    idx = tmp_path / "data" / "answers" / "train.idx"
    idx.write_bytes(idx.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"train.idx has .* bytes, not a whole number of 8-byte offsets"):
        Examples(str(tmp_path / "data" / "answers"), "train", 64, 4, 30)


def test_chat_with_a_tiny_block_size_says_so(tiny_data):
    train.main(TINY + ["--max_iters=1", "--out_dir=weight/a"])
    r = run_script("sample.py", "--out_dir=weight/a", "--chat", check=False)
    assert r.returncode == 1 and "not a chat model" in r.stderr
    assert read_log("weight/a")
