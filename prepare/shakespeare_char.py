"""
Tiny Shakespeare at the character level: data/<name>/{train,val}.bin and meta.json.

    python prepare/shakespeare_char.py                      # downloads input.txt (1.1 MB)
    python prepare/shakespeare_char.py --input ../shared/data/tinyshakespeare.txt   # offline

The character table is every character of the text, sorted (65 for Tiny Shakespeare). The first
90% of the text is train and the last 10% val, as in nanoGPT, so the numbers compare with it.
"""
import argparse
import os
import shutil
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import tokenizer  # noqa: E402
from settings import cli  # noqa: E402
from data import read_utf8  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(path: str) -> None:
    """Fetch the text to path."""
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            text = r.read()
    except OSError as e:  # URLError and socket timeouts are both OSErrors
        raise data.DataError(f"could not download {URL} ({e}). Offline, pass a local copy: "
                             "--input ../shared/data/tinyshakespeare.txt") from None
    with open(path, "wb") as f:
        f.write(text)


def downloaded_input(out_dir: str, build_dir: str) -> str:
    """input.txt in build_dir: copied from out_dir when an earlier run downloaded it there (the
    new folder replaces out_dir whole, so the copy is what keeps it), else downloaded."""
    path, earlier = os.path.join(build_dir, "input.txt"), os.path.join(out_dir, "input.txt")
    if os.path.exists(earlier):
        shutil.copyfile(earlier, path)
    else:
        download(path)
    return path


def write_split(path: str, tok: tokenizer.CharTokenizer, text: str) -> int:
    writer = data.BinWriter(path, tok.vocab_size)
    writer.write(tok.encode(text))
    writer.close()
    return writer.count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", help="local copy of the text (default: download it)")
    parser.add_argument("--name", default="shakespeare_char", help="writes data/<name>/")
    args = parser.parse_args(argv)

    out_dir = os.path.join("data", args.name)
    with data.building(out_dir) as build_dir:
        path = args.input or downloaded_input(out_dir, build_dir)
        text = read_utf8(path)
        if len(text) < 2:
            raise data.DataError(f"{path} holds {len(text)} characters; need at least 2 to split")

        tok = tokenizer.CharTokenizer.from_text(text)
        n = int(len(text) * 0.9)
        n_train = write_split(os.path.join(build_dir, "train.bin"), tok, text[:n])
        n_val = write_split(os.path.join(build_dir, "val.bin"), tok, text[n:])
        source = {"script": "prepare/shakespeare_char.py", "input": args.input or URL,
                  "characters": len(text), "split": "first 90% train, last 10% val",
                  "train_tokens": n_train, "val_tokens": n_val}
        meta = tok.to_meta(source=source)
        tokenizer.save_meta(build_dir, meta)
    print(f"{len(text):,} characters, vocab_size {tok.vocab_size}: "
          f"train {n_train:,} tokens, val {n_val:,} tokens -> {out_dir}/")
    return meta


if __name__ == "__main__":
    cli(main)
