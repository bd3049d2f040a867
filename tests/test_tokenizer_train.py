"""prepare/tokenizer.py: a byte-level BPE trained with rustbpe, run by tiktoken, through every
step that reads text (prepare/text.py, prepare/sft.py, streaming, export's tokenizer.json)."""
import json
import os
import random

import numpy as np
import pytest

from conftest import shared_path

pytest.importorskip("rustbpe", reason="prepare/tokenizer.py trains with rustbpe (pip install rustbpe)")

import tokenizer  # noqa: E402
from data import DataError  # noqa: E402
from prepare import sft as prepare_sft  # noqa: E402
from prepare import text as prepare_text  # noqa: E402
from prepare import tokenizer as prepare_tokenizer  # noqa: E402

MIXED = ["秦川雄帝宅，函谷壯皇居。", "我用Python写代码，速度很快！", "東京タワーへ行きます。カレーライス",
         "한국어 문장입니다.", "emoji 🙂👍🏽 and 🇨🇳 flags", "mixed: naïve café, 2024年10月1日, x² ≤ ∞",
         "tabs\tand\n\nnewlines  \r\n spaces", ""]


def poems(n_bytes: int = 150_000) -> str:
    with open(shared_path("data", "zh", "tang_poems.txt"), "rb") as f:
        return f.read(n_bytes).decode("utf-8", errors="ignore")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "poems.txt"
    path.write_text(poems() + "\n" + "Some English text, to learn a few Latin merges too.\n" * 20,
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok(corpus) -> tokenizer.BPETokenizer:
    return prepare_tokenizer.train([corpus], 1000)


def test_training_is_deterministic(corpus, tok):
    again = prepare_tokenizer.train([corpus], 1000)
    assert again.token_bytes == tok.token_bytes and again.pattern == tok.pattern
    assert tok.vocab_size == 1000 and tok.special_tokens == {"<|endoftext|>": 999}
    assert tok.token_bytes[:256] == [bytes([b]) for b in range(256)]


def test_cli_writes_the_meta_file_atomically_and_it_loads(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prepare_tokenizer.main(["--input", corpus, "--vocab_size", "600", "--name", "small"])
    path = tmp_path / "data" / "tokenizers" / "small.json"
    assert os.listdir(path.parent) == ["small.json"]  # no temp file left beside it
    meta = tokenizer.read_meta(str(path))
    assert meta["kind"] == "bpe" and meta["format_version"] == tokenizer.META_VERSION
    assert meta["pattern"] == prepare_tokenizer.SPLIT_PATTERN and meta["vocab_size"] == 600
    assert meta["source"]["trained"]["tokens_per_char"] < 2
    assert "tokens/char" in capsys.readouterr().out


@pytest.mark.parametrize("text", MIXED)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tokenizer.from_meta(json.loads(json.dumps(tok.to_meta()))).encode(text) == tok.encode(text)


def test_poems_compress_far_better_than_bytes(tok):
    text = poems(30_000)
    assert len(tok.encode(text)) < 0.8 * len(text.encode())  # 1,000 ids: still well under 3 per char


def test_decoding_arbitrary_ids_never_crashes(tok):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        text = tok.decode(ids)  # invalid UTF-8 becomes U+FFFD, never an exception
        assert tok.decode(tok.encode(text)) == text
        raw = tok.decode_bytes(ids)
        try:
            valid = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.decode_bytes(tok.encode(valid)) == raw


def test_invalid_utf8_input_is_an_error_naming_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好詩\n".encode() + b"\xff\xfe broken\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"bad\.txt:2: not UTF-8"):
        prepare_tokenizer.main(["--input", str(bad), "--vocab_size", "300", "--name", "bad"])
    assert not (tmp_path / "data" / "tokenizers" / "bad.json").exists()


def test_vocab_size_must_fit_uint16_with_the_chat_tokens(tmp_path, monkeypatch):
    prepare_tokenizer.check_vocab_size(65530)  # + 5 chat tokens = 65,535 ids
    for n in (65531, 70000, 256):
        with pytest.raises(DataError, match=f"--vocab_size {n}: must be 257 .* to 65,530"):
            prepare_tokenizer.check_vocab_size(n)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="65,530"):  # refused before reading any input
        prepare_tokenizer.main(["--input", "missing.txt", "--vocab_size", "65536", "--name", "x"])


def test_stream_decoder_never_prints_a_broken_character(tok):
    text = "春眠不覺曉🐉，處處聞啼鳥𝄞"  # the dragon and the clef are not in the corpus: byte tokens
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert any(not _is_utf8(p) for p in pieces)  # a character is split across tokens
    decoder = tokenizer.StreamDecoder(tok)
    out = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) == text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_chunked_encoding_equals_whole_encoding(tok):
    """prepare/text.py cuts a .txt file at newlines between non-space characters; the split
    pattern must never join such a newline to its neighbours."""
    text = poems(60_000)
    buf, ids = text.encode(), []
    while buf:
        cut = prepare_text.find_cut(buf[:4096]) if len(buf) > 4096 else len(buf)
        ids += tok.encode(buf[:cut].decode())
        buf = buf[cut:]
    assert ids == tok.encode(text)


def test_prepare_text_with_a_trained_tokenizer_by_name_and_path(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_tokenizer.main(["--input", corpus, "--vocab_size", "800", "--name", "zh"])
    for name, how in (("by_name", "zh"), ("by_path", "data/tokenizers/zh.json")):
        meta = prepare_text.main(["--input", corpus, "--name", name, "--tokenizer", how,
                                  "--val_fraction", "0.2", "--workers", "2", "--chunk_size", "20000"])
        assert meta["kind"] == "bpe" and meta["vocab_size"] == 800
    for split in ("train", "val"):
        a, b = (np.fromfile(f"data/{n}/{split}.bin", dtype=np.uint16) for n in ("by_name", "by_path"))
        assert np.array_equal(a, b) and len(a)
    tok = tokenizer.from_meta(tokenizer.load_meta("data/by_name"))
    ids = np.concatenate([np.fromfile(f"data/by_name/{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert sorted(tok.decode(ids.tolist())) == sorted(open(corpus, encoding="utf-8").read() + "<|endoftext|>")
    with pytest.raises(DataError, match=r"nope\.json: no such file; train one with"):
        prepare_text.main(["--input", corpus, "--name", "x", "--tokenizer", "nope.json"])


def test_export_tokenizer_json_matches_with_the_tokenizers_library(tok):
    hf = pytest.importorskip("tokenizers")
    from convert import tokenizer_json
    meta = tok.to_meta()
    chat = tokenizer.from_meta(meta)
    chat.add_special_tokens(tokenizer.CHAT_TOKENS)
    for m in (meta, chat.to_meta()):
        exported = hf.Tokenizer.from_str(json.dumps(tokenizer_json(m)))
        for text in MIXED + [poems(3000)]:
            assert exported.encode(text, add_special_tokens=False).ids == tok.encode(text), text
            assert exported.decode(tok.encode(text)) == text
    ids, _ = tokenizer.render_conversation(chat, [{"role": "user", "content": "你好"}])
    assert exported.decode(ids, skip_special_tokens=False) == "<|user|>你好<|end|>"


def test_meta_of_an_older_version_still_loads(tmp_path):
    old = {"kind": "char", "vocab_size": 3, "chars": ["春", "眠", "\n"]}  # version 1: no format_version
    (tmp_path / "meta.json").write_text(json.dumps(old, ensure_ascii=False), encoding="utf-8")
    assert tokenizer.from_meta(tokenizer.load_meta(str(tmp_path))).encode("春眠") == [0, 1]
    newer = dict(old, format_version=tokenizer.META_VERSION + 1)
    (tmp_path / "meta.json").write_text(json.dumps(newer), encoding="utf-8")
    with pytest.raises(ValueError, match="newer than this danlu"):
        tokenizer.load_meta(str(tmp_path))


def test_preference_records_train_on_chosen_and_drop_rejected(tok, tmp_path):
    base = tmp_path / "base"
    tokenizer.save_meta(str(base), tok.to_meta())
    records = [{"conversations": [{"from": "human", "value": "寫一句詩。"}],
                "chosen": {"from": "gpt", "value": "春眠不覺曉。"},
                "rejected": {"from": "gpt", "value": "我不會寫詩。"}},
               {"chosen": [{"role": "user", "content": "再寫一句。"}, {"role": "assistant", "content": "處處聞啼鳥。"}],
                "rejected": [{"role": "user", "content": "再寫一句。"}, {"role": "assistant", "content": "不要。"}]}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "sft"
    summary = prepare_sft.build_sft_dataset([str(path)], str(base), str(out), val_fraction=0.5)
    assert summary["kept"] == 2 and summary["rejected_skipped"] == 2
    chat = tokenizer.from_meta(tokenizer.load_meta(str(out)))
    targets, everything = [], []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        mask = np.fromfile(out / f"{split}.mask.bin", dtype=np.uint8)
        starts = list(np.fromfile(out / f"{split}.idx", dtype=np.uint64)) + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            everything.append(chat.decode(ids[a:b].tolist()))
            targets.append(chat.decode(ids[a:b][mask[a:b] == 1].tolist()))
    assert sorted(targets) == ["春眠不覺曉。<|end|>", "處處聞啼鳥。<|end|>"]
    assert not any("不會" in t or "不要" in t for t in everything)


def test_real_preference_file(tok, tmp_path):
    base = tmp_path / "base"
    tokenizer.save_meta(str(base), tok.to_meta())
    path = shared_path("data", "sft", "dpo_zh_demo.json")
    summary = prepare_sft.build_sft_dataset([path], str(base), str(tmp_path / "sft"), max_length=4096)
    assert summary["records_read"] == 300 and summary["kept"] + summary["skipped"]["too_long"] == 300
    assert summary["rejected_skipped"] == summary["kept"] > 200
