"""bench.py runs end to end in a tiny configuration and writes the JSON it promises."""
import json
import math

import pytest

import bench
from conftest import write_char_dataset

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16",
        "--batch_size=4", "--bench_warmup=1", "--bench_iters=2", "--sample_tokens=24",
        "--loader_batches=5", "--peak_size=64", "--peak_seconds=0.05"]


@pytest.fixture
def char_dataset(tmp_path):
    folder = str(tmp_path / "chars")
    write_char_dataset(folder, "to be or not to be, that is the question.\n" * 50, n_val=300)
    return folder


@pytest.mark.parametrize("extra", [[], ["--optimizer=muon", "--pos_emb=rope", "--mlp=relu2",
                                        "--gradient_accumulation_steps=2"]])
def test_bench_writes_json(tmp_path, char_dataset, extra):
    out = tmp_path / "bench.json"
    bench.main(TINY + [f"--dataset={char_dataset}", f"--out={out}"] + extra)
    result = json.loads(out.read_text())
    for key in ("device", "peak_flops", "params", "train", "sampling", "loader", "config"):
        assert key in result
    train = result["train"]
    for key in ("tokens_per_s", "ms_per_iter", "mfu", "flops_per_token", "split_ms_per_iter"):
        assert math.isfinite(train[key]) if not isinstance(train[key], dict) else train[key]
    assert set(train["split_ms_per_iter"]) == {"data", "forward", "backward", "optimizer"}
    assert result["sampling"]["identical"] and result["sampling"]["new_tokens"] == 24
    assert result["loader"]["batches_per_s"] > 0
    assert result["data"] == char_dataset


def test_bench_without_dataset_uses_random_tokens(tmp_path):
    out = tmp_path / "b.json"
    result = bench.main(TINY + ["--dataset=no_such_dataset", "--vocab_size=50", f"--out={out}"])
    assert result["data"] == "random tokens"
    assert json.loads(out.read_text())["model_config"]["vocab_size"] == 50
