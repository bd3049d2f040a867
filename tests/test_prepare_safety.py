"""Every prepare script keeps what the user had and refuses bad input in one line: a re-run that
fails leaves data/<name> byte for byte as it was (data.building), a missing or binary file is an
error naming the file and line, and SFT records a tokenizer cannot encode are skipped."""
import json
import os
import subprocess

import pytest

import tokenizer
from conftest import run_script
from data import DataError
from prepare import sft as prepare_sft
from prepare import shakespeare_char, text, tiny_cls
from prepare.sft import RecordError, build_sft_dataset
from test_sft_prepare import build, make_base, write_records
from test_tiny_cls_prepare import VOCAB, write_jsonl

BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"  # an image: not UTF-8 from byte 0
LATIN1 = "first line\nsecond line\n\u00e9t\u00e9\n".encode("latin-1")  # not UTF-8 on line 3


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path, where the scripts write data/<name>/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: str) -> dict:
    """{relative path: bytes} of every file under folder."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def chat(user: str, assistant: str) -> dict:
    return {"conversations": [{"role": "user", "content": user},
                              {"role": "assistant", "content": assistant}]}


# ----------------------------------------------------------------------------- one builder per script
# Each writes data/ds from small inputs; a higher version gives different files.

def prepare_shakespeare(version: int) -> None:
    with open("play.txt", "w", encoding="utf-8") as f:
        f.write("".join(f"Line {i}: hear me speak, version {version}.\n" for i in range(20)))
    shakespeare_char.main(["--input", "play.txt", "--name", "ds"])


def prepare_text(version: int) -> None:
    with open("notes.txt", "w", encoding="utf-8") as f:
        f.write(f"Some notes, version {version}.\n" * (10 + version))
    text.main(["--input", "notes.txt", "--name", "ds", "--tokenizer", "char", "--workers", "1",
               "--val_fraction", "0.3"])


def prepare_tiny_cls(version: int) -> None:
    with open("vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(VOCAB)}, f)
    rows = [{"tokens": f"<IMG> <Z_00{k % 3}> </IMG>", "label": k % 2} for k in range(3 + version)]
    write_jsonl("train.jsonl", rows)
    write_jsonl("val.jsonl", rows[:2])
    tiny_cls.main(["--jsonl", "train.jsonl", "--val_jsonl", "val.jsonl", "--vocab", "vocab.json",
                   "--name", "ds"])


def prepare_sft_chats(version: int) -> None:
    if not os.path.exists("base/meta.json"):
        make_base("base", tokenizer.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz0123 ?!"))
    write_records("chats.jsonl", [chat(f"hi {k}", f"hello {version}") for k in range(4)])
    prepare_sft.main(["--input", "chats.jsonl", "--name", "ds", "--base", "base"])


BUILDERS = {"shakespeare_char": prepare_shakespeare, "text": prepare_text,
            "tiny_cls": prepare_tiny_cls, "sft": prepare_sft_chats}


@pytest.mark.parametrize("script", BUILDERS)
def test_failed_rerun_leaves_the_dataset_as_it_was(workdir, monkeypatch, script):
    BUILDERS[script](1)
    before = snapshot("data/ds")

    def disk_full(*args, **kwargs):  # the last step of every script fails
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "save_meta", disk_full)
        with pytest.raises(OSError, match="No space"):
            BUILDERS[script](2)
    assert snapshot("data/ds") == before  # every file, meta.json included
    assert os.listdir("data") == ["ds"]  # the temp folder is gone

    BUILDERS[script](2)  # and a re-run that succeeds replaces the dataset whole
    after = snapshot("data/ds")
    assert after != before and set(after) == set(before)
    assert os.listdir("data") == ["ds"]


def test_shakespeare_rebuild_keeps_the_downloaded_text(workdir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the text was downloaded before: it must not be fetched again")
    monkeypatch.setattr(shakespeare_char.urllib.request, "urlopen", no_network)
    os.makedirs("data/shakespeare_char")
    with open("data/shakespeare_char/input.txt", "w") as f:
        f.write("To be, or not to be: that is the question.\n")
    shakespeare_char.main([])  # the new folder replaces the old one, input.txt included
    assert sorted(os.listdir("data/shakespeare_char")) == ["input.txt", "meta.json", "train.bin",
                                                           "val.bin"]


def test_sft_rerun_with_no_usable_record_keeps_the_dataset(workdir):
    prepare_sft_chats(1)
    before = snapshot("data/ds")
    odd = {"conversations": [{"role": "narrator", "content": "x"}]}
    write_records("odd.jsonl", [odd, odd])
    with pytest.raises(ValueError, match="no conversation was kept out of 4 records"):
        prepare_sft.main(["--input", "odd.jsonl", "--val_input", "odd.jsonl", "--name", "ds",
                          "--base", "base"])  # with --val_input, each split is written directly
    assert snapshot("data/ds") == before
    assert os.listdir("data") == ["ds"]


def test_tiny_cls_empty_val_file_keeps_the_dataset_and_names_the_file(workdir):
    prepare_tiny_cls(1)
    before = snapshot("data/ds")
    write_jsonl("empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl holds no examples, so the val split") as e:
        tiny_cls.main(["--jsonl", "train.jsonl", "--val_jsonl", "empty.jsonl", "--vocab",
                       "vocab.json", "--name", "ds"])
    assert "--val_jsonl" not in str(e.value)  # it was given: suggesting it is no help
    assert snapshot("data/ds") == before
    assert os.listdir("data") == ["ds"]


def test_tiny_cls_split_left_empty_by_val_frac_says_what_to_change(workdir):
    prepare_tiny_cls(1)  # for vocab.json
    write_jsonl("few.jsonl", [{"tokens": "<IMG> <Z_000> </IMG>", "label": k} for k in range(3)])
    with pytest.raises(DataError, match=r"few\.jsonl: its 3 examples leave the val split empty "
                                        r"with --val_frac 0\.2.*--val_jsonl FILE"):
        tiny_cls.main(["--jsonl", "few.jsonl", "--vocab", "vocab.json", "--name", "few"])
    assert os.listdir("data") == ["ds"]


# ----------------------------------------------------------------------------- missing and binary files

def test_missing_files_are_named(workdir):
    with pytest.raises(DataError, match=r"^missing\.txt: no such file or directory; check"):
        shakespeare_char.main(["--input", "missing.txt"])
    prepare_tiny_cls(1)
    with pytest.raises(DataError, match=r"^missing\.jsonl: no such file"):
        tiny_cls.main(["--jsonl", "missing.jsonl", "--vocab", "vocab.json"])
    with pytest.raises(DataError, match=r"^missing\.json: no such file"):
        tiny_cls.main(["--jsonl", "train.jsonl", "--vocab", "missing.json"])
    with pytest.raises(DataError, match=r"^data: is a directory"):
        tiny_cls.main(["--jsonl", "data", "--vocab", "vocab.json"])
    prepare_sft_chats(1)
    with pytest.raises(DataError, match=r"^missing\.jsonl: no such file"):
        prepare_sft.main(["--input", "missing.jsonl", "--name", "x", "--base", "base"])


def test_binary_files_are_named_with_their_line(workdir):
    (workdir / "latin1.txt").write_bytes(LATIN1)
    (workdir / "latin1.json").write_bytes(LATIN1)
    (workdir / "blob.jsonl").write_bytes(BINARY)
    where = r"latin1\.{}:3: not UTF-8 text \(byte 0xe9\); is it a binary file\? Save it as UTF-8"
    with pytest.raises(DataError, match=where.format("txt")):
        shakespeare_char.main(["--input", "latin1.txt"])
    with pytest.raises(DataError, match=where.format("txt")):  # in a later chunk, on 2 workers
        text.main(["--input", "latin1.txt", "--name", "t", "--tokenizer", "char",
                   "--chunk_size", "8", "--workers", "2"])
    (workdir / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        text.main(["--input", "bad.jsonl", "--name", "t", "--tokenizer", "char", "--workers", "1"])
    prepare_tiny_cls(1)
    with pytest.raises(DataError, match=where.format("json")):
        tiny_cls.main(["--jsonl", "train.jsonl", "--vocab", "latin1.json"])
    with pytest.raises(DataError, match=r"blob\.jsonl:1: not UTF-8 text \(byte 0x89\)"):
        tiny_cls.main(["--jsonl", "blob.jsonl", "--vocab", "vocab.json"])
    assert os.listdir("data") == ["ds"]


def test_classify_jsonl_with_bad_utf8_names_file_and_line(workdir):
    """sample.py --classify --jsonl FILE reads FILE with tiny_cls.read_token_examples."""
    prepare_tiny_cls(1)
    tok = tokenizer.from_meta(tokenizer.load_meta("data/ds"))
    good = '{"tokens": "<IMG> <Z_000> </IMG>", "label": 1}\n'.encode()
    (workdir / "eval.jsonl").write_bytes(good + b'{"tokens": "<IMG> \xe9 </IMG>", "label": 1}\n')
    with pytest.raises(DataError, match=r"eval\.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        tiny_cls.read_token_examples("eval.jsonl", tok)


def test_sft_json_array_with_bad_utf8_names_file_and_line(workdir):
    prepare_sft_chats(1)
    (workdir / "chats.json").write_bytes(b'[\n {"instruction": "a", "output": "\xff"}\n]\n')
    with pytest.raises(DataError, match=r"chats\.json:2: not UTF-8 text \(byte 0xff\)"):
        build_sft_dataset(["chats.json"], "base", "data/x")
    (workdir / "chats.json").write_text('[\n {"instruction": "a", "output": "b"},\n oops\n]\n')
    with pytest.raises(RecordError, match=r"chats\.json line 3: not valid JSON \(Expecting value"):
        build_sft_dataset(["chats.json"], "base", "data/x")
    assert os.listdir("data") == ["ds"]


SCRIPT_ARGS = {  # each given an image where it wants text, and the first line of its error
    "prepare/shakespeare_char.py": (["--input", "blob.txt"], "blob.txt:1: not UTF-8 text"),
    "prepare/text.py": (["--input", "blob.txt", "--name", "t", "--tokenizer", "char"],
                        "blob.txt:1: not UTF-8 text"),
    "prepare/tiny_cls.py": (["--jsonl", "blob.jsonl", "--vocab", "vocab.json"],
                            "blob.jsonl:1: not UTF-8 text"),
    "prepare/sft.py": (["--input", "blob.jsonl", "--name", "x", "--base", "base"],
                       "blob.jsonl line 1: not a valid UTF-8 JSON line"),
}


@pytest.mark.parametrize("script", SCRIPT_ARGS)
def test_scripts_print_one_line_and_exit_1(workdir, script):
    for name in ("blob.txt", "blob.jsonl"):
        (workdir / name).write_bytes(BINARY)
    (workdir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    make_base("base", tokenizer.CharTokenizer.from_text("abc"))
    args, message = SCRIPT_ARGS[script]
    r = run_script(script, *args, check=False, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: " + message), r.stderr  # then common.cli's DANLU_DEBUG hint
    assert not os.path.exists("data") or not os.listdir("data")


def test_text_gpt2_with_an_empty_tiktoken_cache_says_how_to_fix_it(workdir, monkeypatch):
    (workdir / "notes.txt").write_text("some notes\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(workdir / "empty_cache"))
    os.makedirs(workdir / "empty_cache")
    try:  # with no network tiktoken fails fast; on a network it may download instead
        r = run_script("prepare/text.py", "--input", "notes.txt", "--name", "g",
                       "--tokenizer", "gpt2", "--workers", "1", check=False, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("tiktoken kept trying the network for 60 s")
    if r.returncode == 0:
        pytest.skip("tiktoken downloaded the encoding: this machine is online")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: tiktoken could not load the 'gpt2' encoding"), r.stderr
    assert "export TIKTOKEN_CACHE_DIR=" in r.stderr.splitlines()[0]
    assert not os.path.exists("data/g")


# ----------------------------------------------------------------------------- SFT records

def test_sft_record_the_char_base_cannot_encode_is_skipped_and_counted(tmp_path):
    base = make_base(tmp_path / "base", tokenizer.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ."))
    records = [chat("hi", "hello"),
               chat("hi", "日本 語"),          # nothing visible survives: an empty answer
               chat("日本", "hello"),          # an empty question
               chat("hi", "hello 日本")]       # some text survives: kept, characters counted
    summary, out = build(tmp_path, base, records)
    assert summary["skipped"]["unencodable"] == 2
    assert summary["kept"] == 3  # two of the records and build()'s val record
    assert summary["dropped_characters"] == 2
    assert "unencodable 2" in prepare_sft.format_summary(summary, out)


def test_sft_jsonl_whose_first_line_is_a_list_is_not_a_json_array(tmp_path):
    base = make_base(tmp_path / "base", tokenizer.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz "))
    path = tmp_path / "in.jsonl"
    path.write_text("[1, 2]\n" + json.dumps(chat("hi", "hello")) + "\n" + json.dumps(chat("a", "b")) + "\n")
    with pytest.raises(RecordError, match=r"in\.jsonl line 1: expected a JSON object, got a list"):
        build_sft_dataset([str(path)], base, str(tmp_path / "out"))
    summary = build_sft_dataset([str(path)], base, str(tmp_path / "out"), skip_bad=True)
    assert (summary["records_read"], summary["kept"], summary["skipped"]["malformed"]) == (3, 2, 1)
    # one array on one line is still a JSON array
    path.write_text(json.dumps([chat("hi", "hello"), chat("a", "b")]) + "\n")
    summary = build_sft_dataset([str(path)], base, str(tmp_path / "out"))
    assert (summary["records_read"], summary["kept"]) == (2, 2)
