"""Pretrained weights in the entry points: train.py --init_from=<Hugging Face folder> continues
pretraining, sft.py --base=<folder> fine-tunes it into a chat model, sample.py --out_dir=<folder>
samples it, each run as a user runs it."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import convert
import sft
import train
from checkpoint import load_checkpoint
from conftest import ROOT, run_script
from prepare.sft import build_sft_dataset
from prepare.text import main as prepare_text
from test_convert import CORPUS, save_hf_model
from test_sft import chat_records

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama_folder(tmp_path, monkeypatch):
    """A tiny random Llama with a byte-level BPE tokenizer in hf/, and data/corpus tokenized
    with that tokenizer."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=420, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    save_hf_model(transformers.LlamaForCausalLM(config), "hf", "qwen2")
    with open("corpus.txt", "w", encoding="utf-8") as f:
        f.write((CORPUS + "\n\n") * 6)
    prepare_text(["--input", "corpus.txt", "--name", "corpus", "--tokenizer", "hf", "--val_fraction",
                  "0.2", "--workers", "1", "--chunk_size", "1000"])
    return tmp_path


def test_continued_pretraining_from_a_hugging_face_folder(llama_folder):
    before = checkpoint.load_pretrained("hf")[1]
    args = ["--init_from=hf", "--dataset=corpus", "--device=cpu", "--block_size=32", "--batch_size=4",
            "--max_iters=4", "--eval_interval=2", "--eval_iters=2", "--learning_rate=1e-3",
            "--warmup_iters=0", "--out_dir=weight/cont"]
    summary = train.main(args)
    evals = summary["last_eval"]
    assert summary["iters"] == 4 and evals["val_loss"] < 6.1  # ln(420) = 6.04 for a random model
    ckpt = load_checkpoint("weight/cont")
    config = json.load(open("weight/cont/config.json"))
    assert (config["pos_emb"], config["norm"], config["mlp"], config["n_kv_head"]) == ("rope", "rmsnorm", "swiglu", 2)
    assert ckpt["tokenizer"]["kind"] == "bpe" and ckpt["model_config"]["block_size"] == 32
    assert not torch.equal(ckpt["model"]["transformer.h.0.attn.c_proj.weight"],
                           before["transformer.h.0.attn.c_proj.weight"])  # it trained
    r = run_script("sample.py", "--out_dir=hf", "--start=The quick", "--max_new_tokens=5", "--temperature=0")
    assert r.stdout.startswith("The quick")
    r = run_script("sample.py", "--out_dir=weight/cont", "--start=大语言", "--max_new_tokens=5")
    assert r.stdout.startswith("大语言")


def test_sft_from_a_hugging_face_folder_makes_a_chat_model(llama_folder):
    with open("chats.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in chat_records(60))
    build_sft_dataset(["chats.jsonl"], "data/corpus", "data/chat", max_length=64, val_fraction=0.1)
    summary = sft.main(["--base=hf", "--dataset=chat", "--out_dir=weight/chat", "--device=cpu",
                        "--block_size=63", "--max_iters=3", "--eval_iters=1", "--batch_size=4"])
    assert summary["iters"] == 3
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir=weight/chat", "--chat",
                        "--max_new_tokens=4"], input="hello\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr  # one reply line
    ckpt = load_checkpoint("weight/chat")
    specials = ckpt["tokenizer"]["special_tokens"]
    assert all(specials[t] < ckpt["model_config"]["vocab_size"] for t in ("<|user|>", "<|end|>"))
    assert ckpt["train_config"]["base"] == "hf"


def test_a_dataset_from_another_tokenizer_is_refused(llama_folder, tmp_path):
    from conftest import write_char_dataset
    write_char_dataset("data/chars", "hello world " * 200, 200)
    with pytest.raises(ValueError, match="not tokenized with its tokenizer.*--tokenizer=hf"):
        train.main(["--init_from=hf", "--dataset=chars", "--device=cpu", "--max_iters=1"])
