"""
Train your own byte-level BPE tokenizer -> data/tokenizers/<name>.json.

    python prepare/tokenizer.py --input ../shared/data/zh/tang_poems.txt --vocab_size 8192 --name tang8k
    python prepare/text.py --input ../shared/data/zh/tang_poems.txt --name tang_bpe --tokenizer tang8k

rustbpe (`pip install rustbpe`, the Rust trainer nanochat uses) learns the merges; the file is
danlu's `bpe` meta.json (tokenizer.py): the bytes of every token by id (id = tiktoken rank),
the split pattern, <|endoftext|> and format_version. tiktoken encodes with it everywhere after
(prepare/text.py, prepare/sft.py, sample, serve), and export.py writes it as tokenizer.json.

--vocab_size counts every id, <|endoftext|> included: the 256 bytes and N - 257 merges are
learned and <|endoftext|> is id N - 1 (a corpus too small for that many merges gives fewer,
and the summary says so). N is at most 65,530: bins hold uint16 ids (<= 65,535) and
prepare/sft.py appends 5 chat tokens. Inputs are read as prepare/text.py reads them (.txt,
.jsonl with {"text": ...}, folders), streamed. The same inputs and N give the same tokens.

At the end it measures the result against GPT-2's BPE on --eval files (default: the first
4 MB of the inputs): tokens per character, and tiktoken's encoding speed on one core.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import tokenizer  # noqa: E402
from files import atomic_write  # noqa: E402
from settings import cli  # noqa: E402
from data import DataError  # noqa: E402
from prepare.text import EOT, documents, list_inputs, read_chunks  # noqa: E402

# The split pattern: GPT-4's (cl100k), except that a run of CJK characters (Han, kana, Hangul)
# is a piece of its own. GPT-4's pattern reads Han as letters, so "，函谷壯皇居" (punctuation
# prefixed to the next clause) and "我用Python写代码" (Latin glued to Han) are single pieces:
# 1,022 of the 8,192 tokens it learned on Tang poems mix Han with punctuation or a space. This
# pattern gives the same tokens/char on held-out modern Chinese (0.814 vs 0.815; trained on the
# poems + 250 of the dpo_zh_demo records, measured on the other 50) and 2.8% more on held-out
# poems (0.853 vs 0.830), and "Python" is one token in English and Chinese text alike. One Han
# character per piece was worse: 0.943 on the poems.
# A newline between two non-space characters stays a piece of its own, which prepare/text.py's
# chunking relies on. "ー" (the kana length mark) is script Common, so it is named.
SPLIT_PATTERN = tokenizer.SPLIT_PATTERN  # kept in tokenizer.py, which runtime code (GGUF export) reads too
CHAT_ROOM = len(tokenizer.CHAT_TOKENS)  # ids prepare/sft.py appends
MAX_VOCAB = 65535 - CHAT_ROOM
EVAL_BYTES = 4 << 20


def check_vocab_size(n: int) -> None:
    if not 257 <= n <= MAX_VOCAB:
        raise DataError(f"--vocab_size {n}: must be 257 (the 256 bytes + <|endoftext|>) to {MAX_VOCAB:,}, "
                        f"so that its ids plus the {CHAT_ROOM} chat tokens prepare/sft.py appends fit the "
                        "uint16 bins (<= 65,535); pick a smaller --vocab_size")


def import_rustbpe():
    try:
        import rustbpe
    except ImportError:
        raise DataError("prepare/tokenizer.py needs rustbpe to train: pip install rustbpe") from None
    return rustbpe


def texts(files: list[str], chunk_size: int = 1 << 20, limit: int | None = None):
    """The documents of the inputs (a .txt file in chunks cut at newlines), in order; with
    limit, stop after about that many bytes."""
    seen = 0
    for chunk in read_chunks(files, chunk_size):
        for text, _ in documents(chunk):
            yield text
        seen += chunk.nbytes
        if limit is not None and seen >= limit:
            return


def train(files: list[str], vocab_size: int) -> tokenizer.BPETokenizer:
    """A BPETokenizer of vocab_size ids (fewer if the inputs run out of merges): the learned
    tokens by rank, then <|endoftext|>. The same inputs give the same table whatever the
    thread count (tests/test_tokenizer_train.py trains twice and compares)."""
    rustbpe = import_rustbpe()
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts(files), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = trainer.get_mergeable_ranks()  # [(token bytes, rank)]
    table = [b""] * len(ranks)
    for token, rank in ranks:
        table[rank] = token
    if sorted(r for _, r in ranks) != list(range(len(ranks))):  # tiktoken needs ranks 0..n-1
        raise DataError("rustbpe returned ranks with gaps; update rustbpe (pip install -U rustbpe)")
    return tokenizer.BPETokenizer(table, SPLIT_PATTERN, {EOT: len(table)})


def measure(tok: tokenizer.Tokenizer, text: str) -> dict:
    """Tokens per character and encoding speed (MB/s, one core) of tok on text."""
    t0 = time.perf_counter()
    n = len(tok.encode(text))
    seconds = time.perf_counter() - t0
    return {"tokens_per_char": round(n / max(1, len(text)), 3),
            "encode_mb_s": round(len(text.encode()) / 1e6 / max(seconds, 1e-9), 2)}


def compare_with_gpt2(tok, eval_files: list[str]) -> dict:
    text = "\n".join(texts(eval_files, limit=EVAL_BYTES))
    out = {"eval_chars": len(text), "trained": measure(tok, text)}
    try:
        out["gpt2"] = measure(tokenizer.TiktokenTokenizer("gpt2"), text)
    except RuntimeError:  # no tiktoken cache offline: compare with nothing rather than fail
        out["gpt2"] = None
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or folders")
    parser.add_argument("--vocab_size", type=int, required=True, help="all ids, <|endoftext|> included")
    parser.add_argument("--name", required=True, help="writes data/tokenizers/<name>.json")
    parser.add_argument("--eval", nargs="+", help="text to measure on (default: the first 4 MB of the inputs)")
    parser.add_argument("--overwrite", action="store_true", help="replace data/tokenizers/<name>.json if it exists")
    args = parser.parse_args(argv)
    check_vocab_size(args.vocab_size)
    path = os.path.join("data", "tokenizers", f"{args.name}.json")
    if os.path.exists(path) and not args.overwrite:
        raise DataError(f"{path} exists (a tokenizer that datasets may use); pick another --name, or pass "
                        "--overwrite to replace it")
    files = list_inputs(args.input)
    eval_files = list_inputs(args.eval) if args.eval else files
    total = sum(os.path.getsize(f) for f in files)

    t0 = time.perf_counter()
    tok = train(files, args.vocab_size)
    seconds = time.perf_counter() - t0
    if tok.vocab_size <= 257:  # 256 bytes + <|endoftext|>: not one merge was learned
        raise DataError(f"{', '.join(args.input)}: {total:,} bytes of text taught no merge; give the trainer "
                        f"real text (nothing was written)")
    stats = compare_with_gpt2(tok, eval_files)
    source = {"script": "prepare/tokenizer.py", "inputs": args.input, "files": len(files), "bytes": total,
              "vocab_size_asked": args.vocab_size, "train_seconds": round(seconds, 2),
              "train_mb_s": round(total / 1e6 / seconds, 2), **stats}
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(tok.to_meta(source=source), f, ensure_ascii=False)

    fewer = f" (the inputs ran out of merges before {args.vocab_size:,})" if tok.vocab_size < args.vocab_size else ""
    gpt2 = stats["gpt2"]
    print(f"vocab_size {tok.vocab_size:,}{fewer}, trained on {total / 1e6:.2f} MB in {seconds:.1f} s "
          f"({source['train_mb_s']} MB/s) -> {path}\n"
          f"  on {stats['eval_chars']:,} characters: {stats['trained']['tokens_per_char']} tokens/char, "
          f"encodes at {stats['trained']['encode_mb_s']} MB/s on one core"
          + (f" (GPT-2: {gpt2['tokens_per_char']} tokens/char, {gpt2['encode_mb_s']} MB/s)" if gpt2 else
             " (no tiktoken cache: not compared with GPT-2)"))
    return source


if __name__ == "__main__":
    cli(main)
