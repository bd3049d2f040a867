"""
Any text corpus -> data/<name>/{train,val}.bin and meta.json, on all cores, streaming.

    python prepare/text.py --input books/ wiki.jsonl --name mycorpus              # GPT-2 BPE
    python prepare/text.py --input notes.txt --name notes --tokenizer char --val_fraction 0.1
    python prepare/text.py --input poems.txt --name poems --tokenizer tang8k   # prepare/tokenizer.py's

Inputs: .txt files (each one document), .jsonl files ({"text": ...} per line, each line one
document), or folders of them (searched recursively, in sorted order). Every document is followed
by <|endoftext|> (GPT-2's id 50256; with --tokenizer char it is a special token appended to the
character table, which a first pass over the inputs builds).

Nothing is read whole: files are cut into chunks of about --chunk_size bytes (a .txt file at a
newline, a .jsonl file between lines) that worker processes encode in order, and the ids stream
into the bins, so a file larger than RAM works.

Split: each piece (a document, or a chunk of a .txt file) goes to val with probability
--val_fraction, drawn from a generator seeded with --seed in input order: the same inputs give
the same split on any number of workers. The first piece always goes to train and, if val is
still empty at the end, the last piece goes to val; with a single piece in all (one short .txt),
its last val_fraction of tokens is val. Small corpora want a larger --val_fraction (e.g. 0.1).
"""
import argparse
import collections
import itertools
import json
import multiprocessing
import os
import sys
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import tokenizer  # noqa: E402
from settings import cli  # noqa: E402
from data import DataError, decode_utf8, open_input  # noqa: E402

EOT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl")


# ----------------------------------------------------------------------------- reading

class Chunk(NamedTuple):
    """One unit of work: part of a .txt file, or whole lines of a .jsonl file."""
    path: str
    kind: str             # "txt" | "jsonl"
    start: int            # byte offset (txt) or number of the first line (jsonl)
    payload: object       # bytes (txt) or a list of lines as bytes (jsonl)
    nbytes: int
    ends_document: bool   # txt: this is the file's last chunk
    first_line: int = 1   # txt: the line the chunk starts on, for error messages


def list_inputs(paths: list[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(p)
                           for f in names if f.endswith(SUFFIXES))
            if not found:
                raise DataError(f"{p}: no .txt or .jsonl files in this folder")
            files += found
        elif not os.path.exists(p):
            raise DataError(f"{p}: no such file or folder")
        elif not p.endswith(SUFFIXES):
            raise DataError(f"{p}: not a .txt or .jsonl file")
        else:
            files.append(p)
    return files


def _char_at(buf: bytes, i: int, before: bool) -> str:
    """The character just before (or at) byte i of UTF-8 bytes; '' at either end."""
    window = buf[max(0, i - 4):i] if before else buf[i:i + 4]
    text = window.decode("utf-8", errors="ignore")
    return (text[-1:] if before else text[:1])


def find_cut(buf: bytes) -> int:
    """Where to end a chunk taken from buf (a UTF-8 character boundary).

    Best: just after a newline with a non-space character on each side. GPT-2's pre-tokenizer
    never joins such a newline to its neighbours, so the chunks encode to exactly the tokens of
    the whole text. Else after the last newline; else at the last character boundary."""
    lo = len(buf) // 2
    i = buf.rfind(b"\n", lo)
    fallback = i + 1 if i >= 0 else None
    for _ in range(10_000):  # bounded: a run of blank lines must not cost quadratic time
        if i < 1:
            break
        before, after = _char_at(buf, i, True), _char_at(buf, i + 1, False)
        if before and after and not before.isspace() and not after.isspace():
            return i + 1
        i = buf.rfind(b"\n", lo, i)
    if fallback:
        return fallback
    cut = len(buf) - 1
    while cut > 0 and buf[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: step back
        cut -= 1
    return cut if cut > 0 else len(buf)


def read_txt(path: str, chunk_size: int):
    with open_input(path) as f:
        carry, offset, line = f.read(len(b"\xef\xbb\xbf")), 0, 1
        if carry == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark is not text
            carry, offset = b"", 3
        while True:
            buf = carry + f.read(chunk_size)
            if not f.peek(1):
                yield Chunk(path, "txt", offset, buf, len(buf), True, line)
                return
            cut = find_cut(buf)
            yield Chunk(path, "txt", offset, buf[:cut], cut, False, line)
            carry, offset, line = buf[cut:], offset + cut, line + buf.count(b"\n", 0, cut)


def read_jsonl(path: str, chunk_size: int):
    with open_input(path) as f:
        lines, nbytes, first = [], 0, 1
        for number, line in enumerate(f, 1):
            lines.append(line)
            nbytes += len(line)
            if nbytes >= chunk_size:
                yield Chunk(path, "jsonl", first, lines, nbytes, True)
                lines, nbytes, first = [], 0, number + 1
        if lines:
            yield Chunk(path, "jsonl", first, lines, nbytes, True)


def read_chunks(files: list[str], chunk_size: int):
    for path in files:
        reader = read_txt if path.endswith(".txt") else read_jsonl
        yield from reader(path, chunk_size)


# ----------------------------------------------------------------------------- workers

def documents(chunk: Chunk) -> list[tuple[str, bool]]:
    """The (text, ends_document) pieces of a chunk, empty documents left out."""
    if chunk.kind == "txt":
        text = decode_utf8(chunk.payload, chunk.path, chunk.first_line)
        return [(text, chunk.ends_document)] if text else []
    docs = []
    for number, line in enumerate(chunk.payload, chunk.start):
        if not line.strip():
            continue
        line = decode_utf8(line, chunk.path, number).removeprefix("\ufeff")  # a BOM is not JSON
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{chunk.path}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{chunk.path}:{number}: expected an object with a "text" string')
        if record["text"]:
            docs.append((record["text"], True))
    return docs


_TOK, _EOT_ID = None, None


def init_worker(meta: dict | None) -> None:
    global _TOK, _EOT_ID
    if meta is not None:
        _TOK = tokenizer.from_meta(meta)
        _EOT_ID = _TOK.token_id(meta.get("document_end", EOT))


def encode_chunk(chunk: Chunk):
    """(ids of all pieces, the length of each piece, documents ended, bytes read)."""
    docs = documents(chunk)
    pieces = [_TOK.encode(text) + ([_EOT_ID] if ends else []) for text, ends in docs]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    # uint16 is safe: the BinWriters were opened first and refuse a vocab_size over 65536
    ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.uint16,
                      count=int(lengths.sum()))
    return ids, lengths, sum(ends for _, ends in docs), chunk.nbytes


def chars_of_chunk(chunk: Chunk):
    return set().union(*(set(text) for text, _ in documents(chunk))), chunk.nbytes


def ordered_map(func, chunks, workers: int, meta: dict | None):
    """func over chunks on `workers` processes, results in input order. Unlike Pool.imap, which
    reads its whole input ahead, at most 2 * workers chunks are in flight, so memory stays flat
    whatever the size of the input."""
    if workers <= 1:
        init_worker(meta)
        yield from map(func, chunks)
        return
    with multiprocessing.Pool(workers, init_worker, (meta,)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(func, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- writing

class Splitter:
    """Routes pieces to train.bin or val.bin by the rule in the module docstring."""

    def __init__(self, out_dir: str, vocab_size: int, val_fraction: float, seed: int):
        self.writers = {s: data.BinWriter(os.path.join(out_dir, f"{s}.bin"), vocab_size)
                        for s in ("train", "val")}
        self.pieces = {"train": 0, "val": 0}
        self.rng = np.random.default_rng(seed)
        self.val_fraction = val_fraction
        self.held = None  # the latest pieces, kept back until we know whether they are the last

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths):
            if self.held is not None:
                self._route(*self.held, last=False)
            self.held = (ids, lengths)

    def _route(self, ids, lengths, last: bool) -> None:
        to_val = self.rng.random(len(lengths)) < self.val_fraction
        first = self.pieces["train"] + self.pieces["val"] == 0
        if first and last and len(lengths) == 1:
            return self._cut_single(ids)
        if first:
            to_val[0] = False
        if last and self.pieces["val"] == 0 and not to_val.any():
            to_val[-1] = True
        mask = np.repeat(to_val, lengths)
        self._write("train", ids[~mask], int((~to_val).sum()))
        self._write("val", ids[mask], int(to_val.sum()))

    def _cut_single(self, ids) -> None:
        if len(ids) < 2:
            raise DataError(f"the inputs hold {len(ids)} token(s); need at least 2 to split")
        cut = len(ids) - max(1, round(len(ids) * self.val_fraction))
        self._write("train", ids[:cut], 1)
        self._write("val", ids[cut:], 1)

    def _write(self, split: str, ids, pieces: int) -> None:
        self.writers[split].write(ids)
        self.pieces[split] += pieces

    def close(self) -> dict:
        if self.held is None:
            raise DataError("the inputs hold no text")
        self._route(*self.held, last=True)
        for w in self.writers.values():
            w.close()
        return {f"{s}_tokens": w.count for s, w in self.writers.items()} | \
               {f"{s}_pieces": n for s, n in self.pieces.items()}


# ----------------------------------------------------------------------------- main

def progress(total: int, desc: str) -> tqdm:
    # disable=None: no bar when stderr is not a terminal
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None)


def char_tokenizer(files, args, total: int) -> tokenizer.CharTokenizer:
    """First pass: the table of every character in the inputs."""
    chars = set()
    with progress(total, "characters") as bar:
        for found, nbytes in ordered_map(chars_of_chunk, read_chunks(files, args.chunk_size),
                                         args.workers, None):
            chars |= found
            bar.update(nbytes)
    tok = tokenizer.CharTokenizer(sorted(chars))
    tok.add_special_tokens([EOT])
    return tok


def encode_all(files, args, tok, out_dir: str, total: int, end: str = EOT) -> dict:
    """Both bins in out_dir (a folder data.building deletes whole if this fails); documents
    end with the special token `end`."""
    splitter = Splitter(out_dir, tok.vocab_size, args.val_fraction, args.seed)
    counts = {"documents": 0, "chunks": 0}
    with progress(total, "encoding") as bar:
        for ids, lengths, docs, nbytes in ordered_map(
                encode_chunk, read_chunks(files, args.chunk_size), args.workers, tok.to_meta(document_end=end)):
            splitter.add(ids, lengths)
            counts["documents"] += docs
            counts["chunks"] += 1
            bar.update(nbytes)
    return counts | splitter.close()


def trained_tokenizer_path(name: str) -> str | None:
    """The file of a tokenizer trained by prepare/tokenizer.py: a path to a .json file, or a NAME
    in data/tokenizers/; None when name is neither."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise DataError(f"--tokenizer {name}: no such file; train one with "
                            "python prepare/tokenizer.py --input FILES --vocab_size N --name NAME")
        return name
    path = os.path.join("data", "tokenizers", f"{name}.json")
    return path if os.path.isfile(path) else None


def resolve_tokenizer(name: str, files, args, total: int) -> tuple[tokenizer.Tokenizer, str]:
    """(tokenizer, document end) for --tokenizer: gpt2, char, a trained tokenizer (NAME or
    PATH.json), else the tokenizer of a model to continue pretraining."""
    if name == "char":
        return char_tokenizer(files, args, total), EOT
    if name == "gpt2":
        return tokenizer.TiktokenTokenizer("gpt2"), EOT
    path = trained_tokenizer_path(name)
    if path is None and not os.path.exists(name) and "/" not in name and not name.startswith("gpt2-"):
        trained = sorted(f[:-5] for f in os.listdir(os.path.join("data", "tokenizers")) if f.endswith(".json")) \
            if os.path.isdir(os.path.join("data", "tokenizers")) else []
        raise DataError(f"--tokenizer={name}: not char, gpt2, a tokenizer trained with prepare/tokenizer.py "
                        f"(data/tokenizers/{name}.json does not exist; there: {', '.join(trained) or 'none'}), "
                        "a Hugging Face folder or a run folder")
    if path is None:
        return model_tokenizer(name)
    tok = tokenizer.from_meta(tokenizer.read_meta(path, fix="train it again with prepare/tokenizer.py"))
    tok.add_special_tokens([EOT])  # prepare/tokenizer.py puts it in; a hand-made file may not
    return tok, EOT


def model_tokenizer(source: str) -> tuple[tokenizer.Tokenizer, str]:
    """(tokenizer, document end) of a model to continue pretraining (train.py --init_from=
    source). Documents end with its <|endoftext|>, else the folder's eos token, else an
    appended <|endoftext|> (train.py grows the embedding for it)."""
    from checkpoint import tokenizer_meta  # here: plain text preparation never loads the model code
    from convert import check_fits_uint16
    meta = tokenizer_meta(source)
    check_fits_uint16(meta, source)
    tok = tokenizer.from_meta(meta)
    eos = meta.get("eos_token")
    end = EOT if EOT in tok.special_tokens or eos not in tok.special_tokens else eos
    tok.add_special_tokens([end])
    return tok, end


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may use
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or folders")
    parser.add_argument("--name", required=True, help="writes data/<name>/")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="gpt2 | char | NAME (data/tokenizers/NAME.json, from prepare/tokenizer.py) | "
                             "PATH.json | a Hugging Face folder, gpt2-medium/-large/-xl or a run "
                             "folder (weight/<run>): the tokenizer of the model you will start from")
    parser.add_argument("--val_fraction", type=float, default=0.0005)
    parser.add_argument("--seed", type=int, default=2357)
    parser.add_argument("--workers", type=int, default=usable_cores())
    parser.add_argument("--chunk_size", type=int, default=1 << 20, help="bytes per work unit")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")

    files = list_inputs(args.input)
    total = sum(os.path.getsize(f) for f in files)
    out_dir = os.path.join("data", args.name)
    tok, end = resolve_tokenizer(args.tokenizer, files, args, total)
    with data.building(out_dir) as build_dir:
        counts = encode_all(files, args, tok, build_dir, total, end)
        source = {"script": "prepare/text.py", "inputs": args.input, "files": len(files),
                  "bytes": total, "val_fraction": args.val_fraction, "seed": args.seed,
                  "split": "per document (or .txt chunk), seeded; see prepare/text.py",
                  "tokenizer": args.tokenizer, **counts}
        meta = tok.to_meta(source=source, document_end=end)
        tokenizer.save_meta(build_dir, meta)
    print(f"{len(files)} files, {counts['documents']:,} documents, vocab_size {tok.vocab_size}: "
          f"train {counts['train_tokens']:,} tokens, val {counts['val_tokens']:,} tokens "
          f"-> {out_dir}/")
    return meta


if __name__ == "__main__":
    cli(main)
