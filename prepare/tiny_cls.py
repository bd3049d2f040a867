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
  python prepare/tiny_cls.py --image_dir DIR [--name NAME]
                                                       # image files         -> data/tiny_cls_images
Writes train/val .bin + .idx + .mask.bin, meta.json (tokenizer, class names, the codebook whole,
provenance) and, for images, codebook.npz, which encode_images() uses to turn new images into
the same codes.

Image folders: DIR/train/<class>/* and DIR/val/<class>/* (without val/, or with one folder per
class, DIR/<class>/*, a stratified, seeded --val_frac of each class goes to val). Class names
are the folder names, any strings, sorted: class k is <CLS_k>. Any image Pillow reads (PNG,
JPEG, BMP, ...; any size or mode) becomes gray ink (--polarity), fitted to --image_size
(--fit pad: letterboxed; ink: strokes cropped and centred) as 0..255 pixels, by the same
function (images.image_pixels) that sample.py --image and the server use; those
settings are recorded in the codebook. An unreadable image is an error naming it (--skip_bad:
left out and counted).

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
Longer than ~500 lines: four sources (digits, MNIST, token JSONL, image folders), each checked
as a user's files must be, feed one writer.
"""
import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from tqdm import tqdm

import data
import tokenizer
from settings import cli
from data import DataError, read_utf8
from images import (CLS, END_IMG, EOS, IMG, INK_FILL, MARKERS, NUM_CLASSES, PAD, UNK, ImageError, class_tokens,
                    code_token, codebook_meta, encode_images, fit_codebook, image_files, image_pixels, read_image,
                    read_token_examples, save_codebook)

DIGITS_NPZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
SEED = 1337
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # idx: uint8 data with 3 dims / 1 dim
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Per-source defaults; any flag given on the command line wins.
DEFAULTS = {
    # 4 shifted copies of each train image (zero-filled shifts of up to 1 pixel): see README
    "digits": dict(name="tiny_cls", codebook="levels", levels=17, patch=2, codes=256, pool=1,
                   augment=4, max_shift=1, num_classes=NUM_CLASSES),
    # 2 copies shifted by up to 2 of 28 pixels: see the README for the measured effect
    "mnist": dict(name="tiny_cls_mnist", codebook="kmeans", levels=17, patch=4, codes=256, pool=1,
                  augment=2, max_shift=2, num_classes=NUM_CLASSES),
    "jsonl": dict(name="tiny_cls_jsonl", num_classes=NUM_CLASSES),
    # image folders: MNIST's recipe at 28x28 (the whole image letterboxed, gray, ink by border)
    "folder": dict(name="tiny_cls_images", codebook="kmeans", levels=17, patch=4, codes=256,
                   pool=1, augment=2, max_shift=2, image_size=(28, 28), fit="pad",
                   polarity="auto"),
}
MAX_VALUE = {"digits": 16, "mnist": 255, "folder": 255}  # pixel value that means "full ink"


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


# ----------------------------------------------------------------------------- image folders

def class_folders(split_dir: str, stats: dict) -> dict[str, list[str]]:
    """{class name: its image files} for the folders of split_dir; the name is the folder's."""
    names = sorted(d for d in os.listdir(split_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
    loose = [f for f in os.listdir(split_dir) if os.path.isfile(os.path.join(split_dir, f))
             and not f.startswith(".")]
    stats["outside_class_folders"] = stats.get("outside_class_folders", 0) + len(loose)
    return {name: image_files(os.path.join(split_dir, name), stats) for name in names}


def find_image_folders(image_dir: str, stats: dict) -> tuple[str, dict, dict | None]:
    """(the train folder, train {class: files}, val {class: files} or None when val is to be
    split off): DIR/train/<class>/* (+ DIR/val/<class>/*) or DIR/<class>/*."""
    if not os.path.isdir(image_dir):
        raise DataError(f"{image_dir}: no such folder; --image_dir wants DIR/<class>/* or "
                        "DIR/train/<class>/* and DIR/val/<class>/*")
    train_dir, val_dir = os.path.join(image_dir, "train"), os.path.join(image_dir, "val")
    if not os.path.isdir(train_dir):
        train_dir, val_dir = image_dir, None
    else:
        stats["ignored_folders"] = sorted(d for d in os.listdir(image_dir) if d not in ("train", "val")
                                          and os.path.isdir(os.path.join(image_dir, d)))
        val_dir = val_dir if os.path.isdir(val_dir) else None
    train = class_folders(train_dir, stats)
    val = class_folders(val_dir, stats) if val_dir else None
    if len(train) < 2:
        raise DataError(f"{train_dir}: {'one class folder' if train else 'no class folders'}; a classifier "
                        f"needs at least two classes: put each class's images in {train_dir}/<class>/")
    empty = [name for name, files in train.items() if not files]
    if empty:
        raise DataError(f"{os.path.join(train_dir, empty[0])}: no image files (PNG, JPEG, BMP, "
                        "...); a class needs train images: add some or remove the folder")
    unknown = sorted(set(val or {}) - set(train))
    if unknown:
        raise DataError(f"{os.path.join(val_dir, unknown[0])}: class {unknown[0]!r} has no train "
                        "folder, so the model could never answer it; add "
                        f"{os.path.join(train_dir, unknown[0])}/ or remove it from val")
    return train_dir, train, val


def pixel_settings(args) -> dict:
    """How a file becomes pixels, recorded in the codebook so every later image is read alike."""
    settings = {"image_shape": list(args.image_size), "fit": args.fit, "polarity": args.polarity,
                "max_value": 255}
    if args.fit == "ink":
        settings["ink_fill"] = args.ink_fill
    return settings


def load_one(job: tuple[str, dict]) -> tuple[np.ndarray | None, str | None]:
    """(uint8 pixels, None) or (None, why not) for one file; runs in a worker process."""
    path, settings = job
    try:
        return image_pixels(read_image(path), settings).astype(np.uint8), None
    except (ImageError, OSError) as e:
        return None, str(e)


def read_all(jobs: list, workers: int):
    """load_one over jobs, in order, in worker processes when there are many."""
    if workers == 1:
        yield from map(load_one, jobs)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(load_one, jobs, chunksize=256)


def load_image_files(paths: list[str], settings: dict, skip_bad: bool, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """((N, H, W) uint8 pixels, indices of the paths they came from). A file that cannot be read
    is an error naming it, or, with skip_bad, left out and counted in stats["bad_files"]."""
    workers = min(os.cpu_count() or 1, 8) if len(paths) >= 2000 else 1
    results = read_all([(path, settings) for path in paths], workers)
    pixels, kept = [], []
    for i, (image, error) in enumerate(tqdm(results, total=len(paths), desc="reading images",
                                            disable=None, leave=False)):
        if image is not None:
            pixels.append(image)
            kept.append(i)
        elif skip_bad:
            stats["bad_files"] = stats.get("bad_files", 0) + 1
            if stats["bad_files"] <= 5:  # a few names to look at, not a list as long as the set
                stats.setdefault("bad_examples", []).append(paths[i])
        else:
            raise DataError(f"{paths[i]}: {error}; replace or remove it, or pass --skip_bad to "
                            "leave unreadable images out (counted)")
    shape = tuple(settings["image_shape"])
    return np.stack(pixels) if pixels else np.zeros((0, *shape), np.uint8), np.array(kept, dtype=np.int64)


def load_image_dir(args, stats: dict) -> tuple[list[str], dict]:
    """(class names, {split: (pixels (N, H, W) uint8, labels)}) from --image_dir."""
    _, train, val = find_image_folders(args.image_dir, stats)
    names = sorted(train)
    settings = pixel_settings(args)
    splits = {}
    for split, folders in (("train", train), ("val", val)):
        if folders is None:
            continue
        paths = [path for name in names for path in folders.get(name, [])]
        labels = np.array([k for k, name in enumerate(names) for _ in folders.get(name, [])], np.int64)
        pixels, kept = load_image_files(paths, settings, args.skip_bad, stats)
        splits[split] = (pixels, labels[kept])
    if val is None:  # one folder per class: a stratified, seeded share goes to val
        pixels, labels = splits["train"]
        train_idx, val_idx = stratified_split(labels, args.val_frac, args.seed)
        splits = {"train": (pixels[train_idx], labels[train_idx]), "val": (pixels[val_idx], labels[val_idx])}
        if not len(val_idx):
            raise DataError(f"{args.image_dir}: its {len(labels)} images leave the val split empty "
                            f"with --val_frac {args.val_frac} (each class gives round(count x "
                            "val_frac) to val); add images, raise --val_frac, or make val/<class>/ "
                            "folders beside train/")
    elif not len(splits["val"][0]):
        raise DataError(f"{os.path.join(args.image_dir, 'val')}: no readable images; put some in "
                        "val/<class>/, or remove val/ to split train by --val_frac")
    # Folders come class by class; evaluation reads the first eval_iters batches in file order,
    # which would then hold only the first classes. A seeded shuffle mixes them.
    orders = {split: mixed_order(len(labels), args.seed) for split, (_, labels) in splits.items()}
    return names, {split: (pixels[orders[split]], labels[orders[split]])
                   for split, (pixels, labels) in splits.items()}


def mixed_order(n: int, seed: int) -> np.ndarray:
    """The order the n images of a folder split are written in: a permutation fixed by seed."""
    return np.random.default_rng(seed).permutation(n)


# ----------------------------------------------------------------------------- token sequences

def image_tokenizer(n_codes: int, num_classes: int = NUM_CLASSES) -> tokenizer.VocabTokenizer:
    """Markers and class answers (all special tokens), then <Z_000>..<Z_{n_codes-1}>."""
    specials = MARKERS + class_tokens(num_classes)
    tokens = specials + [code_token(i) for i in range(n_codes)]
    return tokenizer.VocabTokenizer(tokens, {t: i for i, t in enumerate(specials)}, unk_token=UNK)


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


# ----------------------------------------------------------------------------- the two pipelines

def prepare_images(args, source: str, stats: dict):
    """(tokenizer, {split: (sequences, labels)}, codebook, description, class names) for the
    digits, MNIST or image folders."""
    names = [str(k) for k in range(args.num_classes or NUM_CLASSES)]
    if source == "folder":
        names, loaded = load_image_dir(args, stats)
        (train_x, train_y), (val_x, val_y) = loaded["train"], loaded["val"]
        origin = f"image folders in {args.image_dir}"
        if not len(train_x):
            raise DataError(f"{args.image_dir}: none of the train images could be read "
                            f"({stats.get('bad_files', 0)} skipped as unreadable)")
    elif source == "mnist":
        mnist = load_mnist(args.mnist_dir)
        (train_x, train_y), (val_x, val_y) = mnist["train"], mnist["val"]
        origin = f"MNIST idx files in {args.mnist_dir} (t10k = val)"
    else:
        images, labels = load_digits()
        train, val = stratified_split(labels, args.val_frac, args.seed)
        train_x, train_y, val_x, val_y = images[train], labels[train], images[val], labels[val]
        origin = ("UCI ML Repository, Optical Recognition of Handwritten Digits (E. Alpaydin, "
                  "C. Kaynak; CC BY 4.0), via scikit-learn: prepare/digits.npz")
    args.num_classes = len(names)
    top = int(max(train_y.max(), val_y.max(initial=0)))
    if top >= args.num_classes:
        raise DataError(f"{origin}: label {top} but --num_classes is {args.num_classes}")
    n_codes = args.levels if args.codebook == "levels" else args.codes
    if len(MARKERS) + len(names) + n_codes > 65535:
        raise DataError(f"{origin}: {len(names)} classes + {n_codes} codes + {len(MARKERS)} markers "
                        "are more tokens than uint16 ids hold (65535); use fewer --codes")
    t0 = time.time()
    codebook = fit_codebook(train_x, args.codebook, MAX_VALUE[source], args.levels, args.patch,
                            args.codes, args.pool, args.seed)  # train images only
    # how any later image (a drawing, a file) becomes pixels: recorded beside the codes
    codebook.update(pixel_settings(args) if source == "folder" else
                    {"fit": "ink", "polarity": "auto",
                     "ink_fill": INK_FILL.get(tuple(train_x.shape[1:]), 1.0)})
    print(f"codebook {args.codebook}: {codebook['n_codes']} codes, {codebook['grid']} grid "
          f"({time.time() - t0:.1f}s)")
    if args.augment:
        train_x = np.concatenate([train_x, shift_copies(train_x, args.augment, args.max_shift,
                                                        args.seed)])
        train_y = np.tile(train_y, args.augment + 1)
    tok = image_tokenizer(codebook["n_codes"], args.num_classes)
    splits = {"train": (image_sequences(encode_images(train_x, codebook), train_y, tok), train_y),
              "val": (image_sequences(encode_images(val_x, codebook), val_y, tok), val_y)}
    return tok, splits, codebook, origin, names


def prepare_jsonl(args, stats: dict):
    """(tokenizer, {split: (sequences, labels)}, None, description, class names) for a
    user's JSONL."""
    tok, added = load_vocab(args.vocab, args.num_classes)
    stats["added_tokens"] = added
    seqs, labels = read_token_examples(args.jsonl, tok, args.max_length, args.num_classes, stats)
    if args.val_jsonl:
        splits = {"train": (seqs, labels),
                  "val": read_token_examples(args.val_jsonl, tok, args.max_length, args.num_classes, stats)}
    else:
        train, val = stratified_split(labels, args.val_frac, args.seed)
        splits = {name: ([seqs[i] for i in idx], [labels[i] for i in idx])
                  for name, idx in (("train", train), ("val", val))}
    names = [str(k) for k in range(args.num_classes)]
    return tok, splits, None, f"JSONL {args.jsonl} with vocab {args.vocab}", names


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


def image_size(text: str) -> tuple[int, int]:
    """--image_size: N (square) or HxW."""
    try:
        h, _, w = text.lower().partition("x")
        size = (int(h), int(w or h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N (square) or HxW, e.g. 28 or 32x24") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sides must be at least 1 pixel")
    return size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mnist_dir", help="folder with the four MNIST idx files (.gz or not)")
    source.add_argument("--jsonl", help='JSONL of {"tokens": "...", "label": k} (needs --vocab)')
    source.add_argument("--image_dir", help="DIR/train/<class>/* [+ DIR/val/<class>/*] or DIR/<class>/*")
    p.add_argument("--vocab", help="vocab.json mapping token -> id, for --jsonl")
    p.add_argument("--val_jsonl", help="val split for --jsonl (default: 80/20 of --jsonl)")
    p.add_argument("--name", help="output folder data/<name> (default per source)")
    p.add_argument("--codebook", choices=["levels", "kmeans"])
    p.add_argument("--levels", type=int, help="levels: intensity values per pixel")
    p.add_argument("--patch", type=int, help="kmeans: patch side in (pooled) pixels")
    p.add_argument("--codes", type=int, help="kmeans: number of centroids")
    p.add_argument("--pool", type=int, help="average-pool FxF pixel blocks first")
    p.add_argument("--augment", type=int, default=None,
                   help="shifted copies per train image (default: 4 for the digits, 2 for MNIST "
                        "and image folders)")
    p.add_argument("--max_shift", type=int, help="largest --augment shift in pixels (default: "
                   "1 for the digits, 2 for MNIST and image folders)")
    p.add_argument("--image_size", type=image_size, help="--image_dir: N or HxW pixels every "
                   "image is fitted to (default 28)")
    p.add_argument("--fit", choices=["pad", "ink"], help="--image_dir: pad = the whole image "
                   "scaled to fit and centred (default); ink = the strokes cropped and centred")
    p.add_argument("--ink_fill", type=float, help="--fit ink: share of the side the strokes "
                   "fill (default 20/28 as in MNIST; 1.0 for 8x8)")
    p.add_argument("--polarity", choices=["auto", "dark", "light"], help="--image_dir: which "
                   "side is ink: auto (the side the border is not; default), dark, light")
    p.add_argument("--skip_bad", action="store_true", help="--image_dir: leave unreadable "
                   "images out (counted) instead of stopping")
    p.add_argument("--val_frac", "--val_fraction", dest="val_frac", type=float, default=0.2,
                   help="val share when splitting")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--num_classes", type=int, help="classes of the digits, MNIST or JSONL "
                   "(default 10); image folders are counted")
    p.add_argument("--max_length", type=int, default=1024, help="--jsonl: longest example kept")
    args = p.parse_args(argv)
    kind = "mnist" if args.mnist_dir else "jsonl" if args.jsonl else "folder" if args.image_dir else "digits"
    if (args.jsonl is None) != (args.vocab is None) or (args.val_jsonl and not args.jsonl):
        p.error("--jsonl and --vocab go together (and --val_jsonl needs them)")
    for key, low in (("levels", 2), ("codes", 2), ("patch", 1), ("pool", 1), ("augment", 0),
                     ("max_shift", 1), ("num_classes", 1), ("max_length", 5)):
        if getattr(args, key) is not None and getattr(args, key) < low:
            p.error(f"--{key} must be at least {low}")
    if not 0 < args.val_frac < 1:
        p.error("--val_frac must be between 0 and 1")
    if args.ink_fill is not None and not 0 < args.ink_fill <= 1:
        p.error("--ink_fill must be above 0 and at most 1")
    image_flags = ("codebook", "levels", "patch", "codes", "pool", "augment", "max_shift")
    if kind == "jsonl" and any(getattr(args, f) for f in image_flags):
        p.error("codebook and --augment flags apply to images; a JSONL is already tokenized")
    folder_flags = ("image_size", "fit", "ink_fill", "polarity", "skip_bad")
    if kind != "folder" and any(getattr(args, f) for f in folder_flags):
        p.error("--image_size, --fit, --ink_fill, --polarity and --skip_bad apply to --image_dir")
    if kind == "folder" and args.num_classes is not None:
        p.error("--num_classes: with --image_dir the classes are the class folders")
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if kind == "folder":
        args.ink_fill = args.ink_fill or INK_FILL.get(tuple(args.image_size), 20 / 28)
        step = args.pool * (args.patch if args.codebook == "kmeans" else 1)
        if args.image_size[0] % step or args.image_size[1] % step:
            p.error(f"--image_size {args.image_size[0]}x{args.image_size[1]} must divide into "
                    f"--pool x --patch = {step}-pixel blocks; pick a multiple of {step}")
    return args, kind


def main(argv=None) -> str:
    args, kind = parse_args(argv)
    t0 = time.time()
    data_dir = os.path.join("data", args.name)
    stats = {}
    if kind == "jsonl":
        tok, splits, codebook, origin, names = prepare_jsonl(args, stats)
    else:
        tok, splits, codebook, origin, names = prepare_images(args, kind, stats)
    book = {"kind": "none", "file": None, "note": "the JSONL came tokenized"}
    if codebook is not None:
        book = codebook_meta(codebook)
        book.update(file="codebook.npz", first_code_id=tok.stoi[code_token(0)])
    extra = {"task": "classify", "class_tokens": class_tokens(args.num_classes), "cls_token": CLS,
             "num_classes": args.num_classes, "class_names": names, "codebook": book,
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
    if kind == "folder":
        print(f"  {len(names)} classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        skipped = {"unreadable images skipped": stats.get("bad_files", 0),
                   "files without an image extension": stats.get("not_images", 0),
                   "files outside class folders": stats.get("outside_class_folders", 0)}
        shown = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v)
        if shown or stats.get("ignored_folders"):
            print(f"  left out: {shown or 'no files'}"
                  + (f"; folders beside train/ and val/: {stats['ignored_folders']}"
                     if stats.get("ignored_folders") else ""))
    return data_dir


if __name__ == "__main__":
    cli(main)
