"""
Images as token sequences for classification: writes data/<name>/ for `train.py config/tiny_cls.py`.

One example is  <IMG> c_1 ... c_N </IMG> <CLS> <CLS_k> <EOS>  where c_i are codebook tokens
(<Z_000>, <Z_001>, ...) and <CLS_k> is the class answer. The answer is the only training target
(mask = 1 at <CLS_k>): the loader (data.Examples) shifts by one, so the target at the <CLS>
position is <CLS_k>, and the model's class is its next-token choice there among the class tokens.

  python prepare/tiny_cls.py                           # embedded UCI digits -> data/tiny_cls
  python prepare/tiny_cls.py --mnist_dir DIR           # MNIST idx files     -> data/tiny_cls_mnist
  python prepare/tiny_cls.py --jsonl FILE --vocab vocab.json [--val_jsonl FILE]
                                                       # tokenized JSONL     -> data/tiny_cls_jsonl
Writes train/val .bin + .idx + .mask.bin, meta.json (tokenizer, classes, codebook, provenance)
and, for images, codebook.npz, which encode_images() uses to turn new images into the same codes.

Codebooks (--codebook, every parameter a flag):
  levels  one token per pixel, intensity rounded to --levels L values. On the 8x8 digits (values
          0..16) L=17 is lossless and gives 69-token examples: small enough to train in minutes
          on a CPU, and nothing is thrown away before the model sees it. The digits' default.
  kmeans  one token per non-overlapping --patch PxP patch: the nearest of --codes K centroids fit
          by k-means (k-means++ seeding, fixed seed) on the train split only, so val never shapes
          the codes. It keeps large images short: MNIST's 784 pixels become 49 tokens with 4x4
          patches, which 2 CPU cores can train on. The MNIST default (P=4, K=256).
  --pool F averages FxF pixel blocks first (MNIST 28x28 -> 14x14). --augment N adds N copies of
  each train image (never val) shifted by up to --max_shift pixels, zero-filled, fixed seed.

The embedded digits (prepare/digits.npz: 1,797 8x8 images, values 0..16, labels 0..9) are
"Optical Recognition of Handwritten Digits" by E. Alpaydin and C. Kaynak, UCI ML Repository
(CC BY 4.0), as distributed with scikit-learn; they are split 80/20, stratified, fixed seed.
"""
import argparse
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from tqdm import tqdm

import data
import tokenizer
from common import cli
from data import DataError
from prepare import decode_utf8, open_input, read_utf8
from prepare.codebook import encode_images, fit_codebook, save_codebook

DIGITS_NPZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
NUM_CLASSES = 10
SEED = 1337
PAD, UNK, IMG, END_IMG, CLS, EOS = "<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"
MARKERS = [PAD, UNK, IMG, END_IMG, CLS, EOS]
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # idx: uint8 data with 3 dims / 1 dim
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Per-source defaults; any flag given on the command line wins.
DEFAULTS = {
    # 4 shifted copies of each train image (zero-filled shifts of up to 1 pixel): see README
    "digits": dict(name="tiny_cls", codebook="levels", levels=17, patch=2, codes=256, pool=1,
                   augment=4, max_shift=1),
    # 2 copies shifted by up to 2 of 28 pixels: see the README for the measured effect
    "mnist": dict(name="tiny_cls_mnist", codebook="kmeans", levels=17, patch=4, codes=256, pool=1,
                  augment=2, max_shift=2),
    "jsonl": dict(name="tiny_cls_jsonl"),
}
MAX_VALUE = {"digits": 16, "mnist": 255}  # pixel value that means "full ink"


def class_token(k: int) -> str:
    return f"<CLS_{k}>"


def class_tokens(num_classes: int = NUM_CLASSES) -> list[str]:
    return [class_token(k) for k in range(num_classes)]


def code_token(i: int) -> str:
    return f"<Z_{i:03d}>"


# ----------------------------------------------------------------------------- image sources

def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The embedded UCI digits: images uint8 (1797, 8, 8) with values 0..16, labels uint8."""
    with np.load(DIGITS_NPZ) as f:
        return f["images"], f["labels"]


def read_idx(path: str, magic: int) -> np.ndarray:
    """A uint8 array from an idx file (MNIST's format: big-endian magic, dims, raw bytes),
    gzipped or not. Anything but exactly the promised bytes is an error naming the file."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: trust the content, not the file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: broken gzip stream ({e})") from None
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise DataError(f"{path}: bad idx magic number {found} (expected {magic}: images 2051, "
                        "labels 2049); is it the right MNIST file?")
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: file ends inside its idx header; it is cut short")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - head != int(np.prod(dims)):
        raise DataError(f"{path}: header promises shape {dims} = {int(np.prod(dims))} bytes but "
                        f"{len(raw) - head} follow; the file is cut short or corrupt")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def find_idx(mnist_dir: str, base: str) -> str:
    for name in (base, base + ".gz"):
        if os.path.exists(os.path.join(mnist_dir, name)):
            return os.path.join(mnist_dir, name)
    wanted = ", ".join(n for pair in MNIST_FILES.values() for n in pair)
    raise DataError(f"{mnist_dir}: no {base}[.gz]; --mnist_dir wants the four standard MNIST idx "
                    f"files ({wanted}), gzipped or not")


def load_mnist(mnist_dir: str) -> dict:
    """{'train': (images, labels), 'val': (images, labels)}; t10k is the val split."""
    out = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_path, labels_path = find_idx(mnist_dir, images_name), find_idx(mnist_dir, labels_name)
        images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                            f"{len(labels)} labels")
        out[split] = (images, labels)
    return out


def stratified_split(labels, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: val_frac of every class, drawn with a fixed seed, goes to
    val, so both splits keep the class balance of the whole set."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        is_val[members[:int(round(len(members) * val_frac))]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(N, H, W) images moved dy rows down and dx columns right, zero-filled."""
    H, W = images.shape[1:]
    out = np.zeros_like(images)
    out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        images[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def shift_copies(images: np.ndarray, n: int, max_shift: int = 1, seed: int = SEED) -> np.ndarray:
    """n shifted copies of every image: (n*N, H, W), copy j of all images before copy j+1.
    Each image gets distinct non-zero offsets (up to (2s+1)^2-1 of them) in a random order. A
    model reading pixels in raster order has no built-in translation invariance; shifts teach it."""
    offsets = [(dy, dx) for dy in range(-max_shift, max_shift + 1)
               for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
    order = np.argsort(np.random.default_rng(seed).random((len(images), len(offsets))), axis=1)
    copies = np.zeros((n, *images.shape), dtype=images.dtype)
    for j in range(n):
        pick = order[:, j % len(offsets)]
        for o, (dy, dx) in enumerate(offsets):
            copies[j, pick == o] = shift(images[pick == o], dy, dx)
    return copies.reshape(-1, *images.shape[1:])


# ----------------------------------------------------------------------------- token sequences

def image_tokenizer(n_codes: int, num_classes: int = NUM_CLASSES) -> tokenizer.VocabTokenizer:
    """Markers and class answers (all special tokens), then <Z_000>..<Z_{n_codes-1}>."""
    specials = MARKERS + class_tokens(num_classes)
    tokens = specials + [code_token(i) for i in range(n_codes)]
    return tokenizer.VocabTokenizer(tokens, {t: i for i, t in enumerate(specials)}, unk_token=UNK)


def tail_ids(tok, label: int) -> list[int]:
    return [tok.stoi[END_IMG], tok.stoi[CLS], tok.stoi[class_token(label)], tok.stoi[EOS]]


def example_mask(length: int) -> np.ndarray:
    """1 only at <CLS_k>, second to last: the class answer is the one training target."""
    mask = np.zeros(length, dtype=np.uint8)
    mask[-2] = 1
    return mask


def image_sequences(codes: np.ndarray, labels, tok) -> np.ndarray:
    """(N, T+5) token ids: <IMG> codes </IMG> <CLS> <CLS_label> <EOS> per image."""
    labels = np.asarray(labels, dtype=np.int64)
    column = lambda name: np.full((len(codes), 1), tok.stoi[name], dtype=np.int64)
    answers = np.array([tok.stoi[t] for t in class_tokens(int(labels.max()) + 1)])[labels]
    return np.concatenate([column(IMG), codes + tok.stoi[code_token(0)], column(END_IMG),
                           column(CLS), answers[:, None], column(EOS)], axis=1)


def load_vocab(path: str, num_classes: int = NUM_CLASSES):
    """(VocabTokenizer, added tokens) from a vocab.json {token: id} with ids 0..n-1. <UNK>, the
    markers and the class tokens are made special tokens, appended when the vocab lacks them."""
    try:
        vocab = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise DataError(f"{path}: a vocab must be one JSON object mapping token -> integer id")
    if sorted(vocab.values()) != list(range(len(vocab))):
        gap = next(i for i, v in enumerate(sorted(vocab.values()) + [-1]) if i != v)
        raise DataError(f"{path}: ids must be exactly 0..{len(vocab) - 1}, each once "
                        f"(id {gap} is missing or repeated)")
    tok = tokenizer.VocabTokenizer(sorted(vocab, key=vocab.get))
    wanted = ([PAD] if PAD in vocab else []) + [UNK, IMG, END_IMG, CLS, EOS]
    added = tok.add_special_tokens(wanted + class_tokens(num_classes))
    tok.unk_token = UNK
    return tok, added


def parse_line(line: str, where: str, num_classes: int) -> tuple[list[str], int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "tokens" not in obj or "label" not in obj:
        raise DataError(f'{where}: expected an object with "tokens" and "label"')
    tokens, label = obj["tokens"], obj["label"]
    if not isinstance(tokens, str):
        raise DataError(f'{where}: "tokens" must be a space-separated string')
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f'{where}: "label" must be an integer, got {label!r}')
    if not 0 <= label < num_classes:
        raise DataError(f'{where}: "label" {label} is outside 0..{num_classes - 1}')
    return tokens.split(), label


def split_image(words: list[str]) -> tuple[list[str], list[str]]:
    """(image codes, old tail) of a tokenized example: the codes are what precedes the last
    </IMG> (or, without one, the trailing <CLS>/<CLS_k>/<EOS> tokens), minus a leading <IMG>."""
    if END_IMG in words:
        end = len(words) - 1 - words[::-1].index(END_IMG)
    else:
        end = len(words)
        while end and (words[end - 1] in (CLS, EOS) or words[end - 1].startswith("<CLS_")):
            end -= 1
    start = 1 if words[:1] == [IMG] else 0
    return words[start:end], words[end:]


def read_jsonl(path: str, tok, max_length: int = 1024, num_classes: int = NUM_CLASSES,
               stats: dict | None = None) -> tuple[list[list[int]], list[int]]:
    """(token-id lists, labels) of a JSONL file of {"tokens": "<IMG> ... <EOS>", "label": k}.

    Every tail is rebuilt from the label as </IMG> <CLS> <CLS_k> <EOS> (old files hold <CLS> in
    the answer slot), tokens tok lacks become <UNK>, and an example longer than max_length loses
    its start, never its tail. stats, if given, counts each fix. A malformed line raises
    DataError naming the file and line."""
    if not isinstance(tok, tokenizer.VocabTokenizer):
        raise DataError(f"{path}: reading token JSONL needs a vocab tokenizer, not {tok.kind!r}")
    missing = [t for t in [IMG, END_IMG, CLS, EOS] + class_tokens(num_classes) if t not in tok.stoi]
    if missing:
        raise DataError(f"the tokenizer lacks {missing}; it was not made for classification")
    if max_length < 5:
        raise ValueError(f"max_length {max_length} cannot hold an image token and the 4-token tail")
    stats = {} if stats is None else stats
    for key in ("examples", "unknown_tokens", "fixed_tails", "label_conflicts", "truncated"):
        stats.setdefault(key, 0)
    unk = tok.stoi.get(tok.unk_token) if tok.unk_token else None
    seqs, labels = [], []
    with open_input(path) as f:  # bytes, so that bad UTF-8 is reported with its line number
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, lineno).removeprefix("\ufeff")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            words, label = parse_line(line, where, num_classes)
            body, old_tail = split_image(words)
            if not body:
                raise DataError(f"{where}: no image tokens before the </IMG> <CLS> tail")
            unknown = [w for w in body if w not in tok.stoi]
            if unknown and unk is None:
                raise DataError(f"{where}: token {unknown[0]!r} is not in the vocabulary")
            ids = [tok.stoi[IMG]] + [tok.stoi.get(w, unk) for w in body] + tail_ids(tok, label)
            stats["unknown_tokens"] += len(unknown)
            stats["fixed_tails"] += words != [IMG, *body, END_IMG, CLS, class_token(label), EOS]
            stats["label_conflicts"] += any(w.startswith("<CLS_") and w != class_token(label)
                                            for w in old_tail)
            if len(ids) > max_length:  # the answer is at the end: cut the start
                ids = ids[-max_length:]
                stats["truncated"] += 1
            seqs.append(ids)
            labels.append(label)
    stats["examples"] += len(seqs)
    return seqs, labels


# ----------------------------------------------------------------------------- the two pipelines

def prepare_images(args, source: str):
    """(tokenizer, {split: (sequences, labels)}, codebook, description) for digits or MNIST."""
    if source == "mnist":
        mnist = load_mnist(args.mnist_dir)
        (train_x, train_y), (val_x, val_y) = mnist["train"], mnist["val"]
        origin = f"MNIST idx files in {args.mnist_dir} (t10k = val)"
    else:
        images, labels = load_digits()
        train, val = stratified_split(labels, args.val_frac, args.seed)
        train_x, train_y, val_x, val_y = images[train], labels[train], images[val], labels[val]
        origin = ("UCI ML Repository, Optical Recognition of Handwritten Digits (E. Alpaydin, "
                  "C. Kaynak; CC BY 4.0), via scikit-learn: prepare/digits.npz")
    top = int(max(train_y.max(), val_y.max()))
    if top >= args.num_classes:
        raise DataError(f"{origin}: label {top} but --num_classes is {args.num_classes}")
    t0 = time.time()
    codebook = fit_codebook(train_x, args.codebook, MAX_VALUE[source], args.levels, args.patch,
                            args.codes, args.pool, args.seed)  # train images only
    print(f"codebook {args.codebook}: {codebook['n_codes']} codes, {codebook['grid']} grid "
          f"({time.time() - t0:.1f}s)")
    if args.augment:
        train_x = np.concatenate([train_x, shift_copies(train_x, args.augment, args.max_shift,
                                                        args.seed)])
        train_y = np.tile(train_y, args.augment + 1)
    tok = image_tokenizer(codebook["n_codes"], args.num_classes)
    splits = {"train": (image_sequences(encode_images(train_x, codebook), train_y, tok), train_y),
              "val": (image_sequences(encode_images(val_x, codebook), val_y, tok), val_y)}
    return tok, splits, codebook, origin


def prepare_jsonl(args, stats: dict):
    """(tokenizer, {split: (sequences, labels)}, None, description) for a user's JSONL."""
    tok, added = load_vocab(args.vocab, args.num_classes)
    stats["added_tokens"] = added
    seqs, labels = read_jsonl(args.jsonl, tok, args.max_length, args.num_classes, stats)
    if args.val_jsonl:
        splits = {"train": (seqs, labels),
                  "val": read_jsonl(args.val_jsonl, tok, args.max_length, args.num_classes, stats)}
    else:
        train, val = stratified_split(labels, args.val_frac, args.seed)
        splits = {name: ([seqs[i] for i in idx], [labels[i] for i in idx])
                  for name, idx in (("train", train), ("val", val))}
    return tok, splits, None, f"JSONL {args.jsonl} with vocab {args.vocab}"


def check_splits(splits: dict, args, kind: str, origin: str) -> None:
    """Refuse an empty split before anything is written, with the fix for this source."""
    for split, (seqs, _) in splits.items():
        if len(seqs):
            continue
        if kind == "jsonl" and args.val_jsonl:
            path = args.val_jsonl if split == "val" else args.jsonl
            raise DataError(f"{path} holds no examples, so the {split} split would be empty; "
                            "give it at least one line")
        if kind == "jsonl":
            n = sum(len(s) for s, _ in splits.values())
            raise DataError(f"{args.jsonl}: its {n} examples leave the {split} split empty with "
                            f"--val_frac {args.val_frac} (each class gives round(count x "
                            "val_frac) to val); add examples, change --val_frac, or pass "
                            "--val_jsonl FILE")
        raise DataError(f"{origin}: no {split} images; check the source files")


def write_dataset(data_dir: str, tok, splits: dict, codebook, extra: dict) -> dict:
    """Write every split, the codebook and meta.json into data_dir, a new folder (so no file
    of an earlier dataset of the same name can be left beside them); returns {split: summary}."""
    written = {}
    for split, (seqs, labels) in splits.items():
        writer = data.ExampleWriter(data_dir, split, tok.vocab_size, with_mask=True)
        for ids in tqdm(seqs, desc=f"writing {split}", disable=None, leave=False):
            writer.add(ids, example_mask(len(ids)))
        written[split] = writer.close()
        written[split]["classes"] = np.bincount(labels, minlength=extra["num_classes"]).tolist()
    if codebook is not None:
        save_codebook(os.path.join(data_dir, "codebook.npz"), codebook)
    extra["example_length"] = max(max(len(s) for s in seqs) for seqs, _ in splits.values())
    extra["source"]["counts"] = written
    tokenizer.save_meta(data_dir, tok.to_meta(**extra))
    return written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mnist_dir", help="folder with the four MNIST idx files (.gz or not)")
    source.add_argument("--jsonl", help='JSONL of {"tokens": "...", "label": k} (needs --vocab)')
    p.add_argument("--vocab", help="vocab.json mapping token -> id, for --jsonl")
    p.add_argument("--val_jsonl", help="val split for --jsonl (default: 80/20 of --jsonl)")
    p.add_argument("--name", help="output folder data/<name> (default per source)")
    p.add_argument("--codebook", choices=["levels", "kmeans"])
    p.add_argument("--levels", type=int, help="levels: intensity values per pixel")
    p.add_argument("--patch", type=int, help="kmeans: patch side in (pooled) pixels")
    p.add_argument("--codes", type=int, help="kmeans: number of centroids")
    p.add_argument("--pool", type=int, help="average-pool FxF pixel blocks first")
    p.add_argument("--augment", type=int, default=None,
                   help="shifted copies per train image (default: 4 for the digits, 2 for MNIST)")
    p.add_argument("--max_shift", type=int, help="largest --augment shift in pixels (default: "
                   "1 for the digits, 2 for MNIST)")
    p.add_argument("--val_frac", type=float, default=0.2, help="val share when splitting")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--num_classes", type=int, default=NUM_CLASSES)
    p.add_argument("--max_length", type=int, default=1024, help="--jsonl: longest example kept")
    args = p.parse_args(argv)
    kind = "mnist" if args.mnist_dir else "jsonl" if args.jsonl else "digits"
    if (args.jsonl is None) != (args.vocab is None) or (args.val_jsonl and not args.jsonl):
        p.error("--jsonl and --vocab go together (and --val_jsonl needs them)")
    for key, low in (("levels", 2), ("codes", 2), ("patch", 1), ("pool", 1), ("augment", 0),
                     ("max_shift", 1), ("num_classes", 1), ("max_length", 5)):
        if getattr(args, key) is not None and getattr(args, key) < low:
            p.error(f"--{key} must be at least {low}")
    if not 0 < args.val_frac < 1:
        p.error("--val_frac must be between 0 and 1")
    image_flags = ("codebook", "levels", "patch", "codes", "pool", "augment", "max_shift")
    if kind == "jsonl" and any(getattr(args, f) for f in image_flags):
        p.error("codebook and --augment flags apply to images; a JSONL is already tokenized")
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, kind


def main(argv=None) -> str:
    args, kind = parse_args(argv)
    t0 = time.time()
    data_dir = os.path.join("data", args.name)
    stats = {}
    if kind == "jsonl":
        tok, splits, codebook, origin = prepare_jsonl(args, stats)
    else:
        tok, splits, codebook, origin = prepare_images(args, kind)
    codebook_meta = {"kind": "none", "file": None, "note": "the JSONL came tokenized"}
    if codebook is not None:
        codebook_meta = {k: v for k, v in codebook.items() if k != "centroids"}
        codebook_meta.update(file="codebook.npz", first_code_id=tok.stoi[code_token(0)])
    extra = {"task": "classify", "class_tokens": class_tokens(args.num_classes), "cls_token": CLS,
             "num_classes": args.num_classes, "codebook": codebook_meta,
             "source": {"script": "prepare/tiny_cls.py", "data": origin, "args": vars(args),
                        **stats}}
    check_splits(splits, args, kind, origin)
    with data.building(data_dir) as build_dir:
        written = write_dataset(build_dir, tok, splits, codebook, extra)
    print(f"{data_dir}: vocab {tok.vocab_size}, examples up to {extra['example_length']} tokens, "
          f"{time.time() - t0:.1f}s")
    for split, w in written.items():
        print(f"  {split:5s} {w['examples']:6d} examples, {w['tokens'] / w['examples']:.1f} "
              f"tokens each, classes {w['classes']}")
    if kind == "jsonl":
        print("  unknown tokens -> <UNK>: {unknown_tokens}, fixed tails: {fixed_tails} (label "
              "disagreed: {label_conflicts}), truncated: {truncated}, added to vocab: "
              "{added_tokens}".format(**stats))
    return data_dir


if __name__ == "__main__":
    cli(main)
