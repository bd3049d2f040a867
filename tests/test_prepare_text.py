"""prepare/shakespeare_char.py and prepare/text.py on small inputs written to tmp_path."""
import json
import os
import urllib.error

import numpy as np
import pytest

import data
import tokenizer
from prepare import shakespeare_char, text

EOT = "<|endoftext|>"
PLAY = "".join(f"Line {i}: Before we proceed any further, hear me speak.\n" for i in range(40))
DOCS = {  # file -> its documents; the folder also holds a file that is not input
    "a.txt": ["First Citizen:\nWe are accounted poor citizens.\n"],
    "c.txt": ["第二个文件：你好，世界。\n"],
    "sub/b.jsonl": ["What authority surfeits on", "would relieve us.\nSpeak!"],
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path, where the scripts write data/<name>/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def corpus(workdir):
    for name, docs in DOCS.items():
        path = workdir / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text(docs[0], encoding="utf-8")
        else:  # a blank line in a .jsonl file is skipped, not an error
            lines = [json.dumps({"text": d, "id": k}, ensure_ascii=False)
                     for k, d in enumerate(docs)]
            path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    (workdir / "corpus" / "notes.md").write_text("not an input")
    return str(workdir / "corpus")


def load_split(name: str, split: str):
    meta = tokenizer.load_meta(os.path.join("data", name))
    data.check_tokens(os.path.join("data", name), split, meta["vocab_size"])  # whole ids, in range
    ids = np.fromfile(os.path.join("data", name, f"{split}.bin"), dtype=np.uint16)
    return tokenizer.from_meta(meta), ids


def documents_in(name: str) -> list[str]:
    """Every document of both splits: each split is whole documents, each ending in EOT."""
    docs = []
    for split in ("train", "val"):
        tok, ids = load_split(name, split)
        assert ids[-1] == tok.token_id(EOT)
        docs += tok.decode(ids).split(EOT)[:-1]
    return docs


# ----------------------------------------------------------------------------- shakespeare_char

def test_shakespeare_char_from_input(workdir):
    (workdir / "play.txt").write_text(PLAY, encoding="utf-8")
    meta = shakespeare_char.main(["--input", "play.txt", "--name", "sc"])
    assert meta["kind"] == "char" and meta["vocab_size"] == len(set(PLAY))
    tok, train = load_split("sc", "train")
    _, val = load_split("sc", "val")
    assert len(train) == int(len(PLAY) * 0.9) and len(train) + len(val) == len(PLAY)
    assert tok.decode(train) + tok.decode(val) == PLAY  # 90% then 10%, in order
    assert meta["source"]["train_tokens"] == len(train)


def test_shakespeare_char_offline_says_pass_input(workdir, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(shakespeare_char.urllib.request, "urlopen", no_network)
    with pytest.raises(data.DataError, match="--input"):
        shakespeare_char.main([])


# ----------------------------------------------------------------------------- text.py

def expected_documents() -> list[str]:
    return [d for docs in DOCS.values() for d in docs]


def test_text_gpt2_folder(corpus, gpt2_available):
    meta = text.main(["--input", corpus, "--name", "g", "--workers", "1", "--val_fraction", "0.3"])
    assert meta["kind"] == "tiktoken" and meta["vocab_size"] == 50257
    src = meta["source"]
    assert src["files"] == 3 and src["documents"] == 4  # notes.md is not an input
    assert src["train_tokens"] > 0 and src["val_tokens"] > 0
    assert sorted(documents_in("g")) == sorted(expected_documents())
    tok, train = load_split("g", "train")
    assert tok.decode(train).startswith(DOCS["a.txt"][0])  # sorted order; the first goes to train
    assert int(np.sum(train == 50256)) + int(np.sum(load_split("g", "val")[1] == 50256)) == 4


def test_text_char_folder(corpus):
    meta = text.main(["--input", corpus, "--name", "c", "--tokenizer", "char",
                      "--workers", "1", "--val_fraction", "0.3"])
    chars = sorted(set("".join(expected_documents())))
    assert meta["kind"] == "char" and meta["chars"] == chars
    assert meta["special_tokens"] == {EOT: len(chars)} and meta["vocab_size"] == len(chars) + 1
    assert sorted(documents_in("c")) == sorted(expected_documents())


def test_text_same_bins_on_any_number_of_workers(corpus):
    args = ["--input", corpus, "--tokenizer", "char", "--chunk_size", "16", "--val_fraction", "0.5"]
    text.main(args + ["--name", "one", "--workers", "1"])
    text.main(args + ["--name", "two", "--workers", "2"])
    for split in ("train.bin", "val.bin", "meta.json"):
        assert open(f"data/one/{split}", "rb").read() == open(f"data/two/{split}", "rb").read()


@pytest.mark.parametrize("workers", [1, 2])
def test_text_malformed_jsonl_names_file_and_line(workdir, workers):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "cut off\n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:3: not valid JSON"):
        text.main(["--input", str(bad), "--name", "bad", "--tokenizer", "char",
                   "--workers", str(workers)])
    bad.write_text('{"text": "fine"}\n["text"]\n')
    with pytest.raises(data.DataError, match=r'bad\.jsonl:2: expected an object with a "text"'):
        text.main(["--input", str(bad), "--name", "bad", "--tokenizer", "char", "--workers", "1"])
    assert not os.path.exists("data/bad/train.bin")


def test_text_bad_inputs(workdir):
    (workdir / "x.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="not a .txt or .jsonl"):
        text.main(["--input", "x.csv", "--name", "x"])
    with pytest.raises(data.DataError, match="no such file"):
        text.main(["--input", "missing.txt", "--name", "x"])


def test_text_chunks_never_cut_a_character(workdir):
    # no newline at all: the cut falls back to a UTF-8 character boundary
    (workdir / "cn.txt").write_text("，".join(["你好"] * 1000), encoding="utf-8")
    chunks = list(text.read_chunks(["cn.txt"], chunk_size=1000))
    assert len(chunks) > 5
    assert "".join(c.payload.decode("utf-8") for c in chunks) == "，".join(["你好"] * 1000)


def test_text_large_txt_streams_in_chunks(workdir, gpt2_available):
    (workdir / "big.txt").write_text(PLAY * 5, encoding="utf-8")
    raw = (workdir / "big.txt").read_bytes()
    chunks = list(text.read_chunks(["big.txt"], chunk_size=1024))
    assert len(chunks) > 5 and all(c.nbytes <= 2048 for c in chunks)
    assert b"".join(c.payload for c in chunks) == raw  # nothing lost
    assert [c.ends_document for c in chunks] == [False] * (len(chunks) - 1) + [True]

    # newline cuts leave GPT-2 BPE unchanged: chunked ids == ids of the whole file
    meta = text.main(["--input", "big.txt", "--name", "big", "--chunk_size", "1024",
                      "--workers", "1", "--val_fraction", "0.2"])
    tok, train = load_split("big", "train")
    _, val = load_split("big", "val")
    whole = tok.encode(raw.decode("utf-8")) + [tok.token_id(EOT)]
    assert meta["source"]["chunks"] == len(chunks) and meta["source"]["documents"] == 1
    assert sorted(np.concatenate([train, val]).tolist()) == sorted(whole)
    assert train[:50].tolist() == whole[:50]


def test_text_single_short_file_still_has_val(workdir):
    (workdir / "short.txt").write_text(PLAY)
    meta = text.main(["--input", "short.txt", "--name", "s", "--tokenizer", "char",
                      "--workers", "1", "--val_fraction", "0.1"])
    src = meta["source"]
    assert src["chunks"] == 1 and src["val_tokens"] == round((len(PLAY) + 1) * 0.1)
    assert src["train_tokens"] + src["val_tokens"] == len(PLAY) + 1
