"""prepare/tiny_cls.py at the token level: example layout, the one target at <CLS>, padding,
truncation, the three sources (embedded digits, MNIST idx files, JSONL) and the codebooks."""
import gzip
import json
import os

import numpy as np
import pytest

import data
import tokenizer
from conftest import shared_path
from data import DataError
from prepare import tiny_cls
from images import encode_images, load_codebook


def prepare(tmp_path, monkeypatch, *argv) -> str:
    monkeypatch.chdir(tmp_path)
    return os.path.join(tmp_path, tiny_cls.main(list(argv)))


def load(data_dir):
    meta = tokenizer.load_meta(data_dir)
    return meta, tokenizer.from_meta(meta)


def examples(data_dir, split):
    """[(token strings, mask)] per example, read straight from the bins."""
    meta, tok = load(data_dir)
    ids = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(data_dir, f"{split}.mask.bin"), dtype=np.uint8)
    starts = np.fromfile(os.path.join(data_dir, f"{split}.idx"), dtype=np.uint64).astype(int)
    ends = np.append(starts[1:], len(ids))
    return [(tok.decode(ids[s:e]).split(), mask[s:e]) for s, e in zip(starts, ends)]


def assert_layout(words, mask, label, n_codes=None):
    assert words[0] == "<IMG>" and words[-4:] == ["</IMG>", "<CLS>", f"<CLS_{label}>", "<EOS>"]
    assert all(w.startswith("<Z_") or w == "<UNK>" for w in words[1:-4])
    assert n_codes is None or len(words) == n_codes + 5
    assert mask.tolist() == [0] * (len(words) - 2) + [1, 0]  # only <CLS_k> is a target


def assert_one_target_at_cls(data_dir, split, labels, block_size=1024):
    """Through the real loader: the only weighted target of each row is <CLS_k>, sitting at the
    <CLS> position; padding (and everything else) is never a target."""
    meta, tok = load(data_dir)
    loader = data.Examples(data_dir, split, block_size, 8, tok.vocab_size, shuffle=False,
                           prompt_loss_weight=0.0)
    rows = np.arange(len(loader))
    x, y, w = loader.collate(rows)
    assert w is None
    lengths = loader.ends - loader.starts - 1
    for b, label in enumerate(labels):
        targets = np.flatnonzero(y[b].numpy() != -1)
        assert len(targets) == 1
        assert x[b, targets[0]] == tok.stoi["<CLS>"]
        assert y[b, targets[0]] == tok.stoi[f"<CLS_{label}>"]
        assert (y[b, min(lengths[b], block_size):] == -1).all()  # padding
    # a prompt weight in (0, 1) puts weight on the image tokens, never on padding
    x, y, w = data.Examples(data_dir, split, block_size, 8, tok.vocab_size, shuffle=False,
                            prompt_loss_weight=0.5).collate(rows)
    assert ((w == 0) == (y == -1)).all()
    return lengths


# ----------------------------------------------------------------------------- embedded digits

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return os.path.join(root, tiny_cls.main(["--augment", "0"]))  # the images as they are
    finally:
        os.chdir(cwd)


def test_digits_default_adds_shifted_train_copies_only(tmp_path, monkeypatch):
    """The default prepare (the README's main command) adds 4 shifted copies of each train
    image; val stays the 359 original images."""
    monkeypatch.chdir(tmp_path)
    meta, _ = load(os.path.join(tmp_path, tiny_cls.main([])))
    counts = meta["source"]["counts"]
    assert counts["train"]["examples"] == 5 * 1438 and counts["val"]["examples"] == 359
    assert meta["source"]["args"]["max_shift"] == 1


def test_source_defaults_and_jsonl_refuses_image_flags():
    args, kind = tiny_cls.parse_args(["--mnist_dir", "somewhere"])
    assert kind == "mnist" and (args.codebook, args.patch, args.codes) == ("kmeans", 4, 256)
    assert (args.augment, args.max_shift, args.name) == (2, 2, "tiny_cls_mnist")  # config/tiny_cls_mnist.py
    args, kind = tiny_cls.parse_args([])
    assert kind == "digits" and (args.codebook, args.augment, args.max_shift) == ("levels", 4, 1)
    for flag in ("--max_shift", "--augment"):
        with pytest.raises(SystemExit):
            tiny_cls.parse_args(["--jsonl", "a.jsonl", "--vocab", "v.json", flag, "1"])


def test_digits_default_is_1797_examples_split_stratified(digits_dir):
    images, labels = tiny_cls.load_digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and len(labels) == 1797
    train, val = tiny_cls.stratified_split(labels, 0.2, tiny_cls.SEED)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1797
    meta, tok = load(digits_dir)
    counts = meta["source"]["counts"]
    assert counts["train"]["examples"] + counts["val"]["examples"] == 1797
    whole = np.bincount(labels)
    assert counts["val"]["classes"] == np.rint(whole * 0.2).astype(int).tolist()
    assert meta["task"] == "classify" and meta["num_classes"] == 10 and meta["cls_token"] == "<CLS>"
    assert meta["class_tokens"] == [f"<CLS_{k}>" for k in range(10)]
    assert meta["example_length"] == 69 and meta["codebook"]["kind"] == "levels"
    assert all(t in tok.special_tokens for t in ["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>",
                                                 "<EOS>"] + meta["class_tokens"])


def test_digits_examples_at_token_level(digits_dir):
    """Levels=17 is lossless on 0..16 pixels: <Z_v> is pixel value v, in raster order."""
    images, labels = tiny_cls.load_digits()
    train, val = tiny_cls.stratified_split(labels, 0.2, tiny_cls.SEED)
    for split, idx in (("train", train), ("val", val)):
        got = examples(digits_dir, split)
        assert len(got) == len(idx)
        for (words, mask), i in zip(got, idx):
            assert_layout(words, mask, labels[i], n_codes=64)
            assert words[1:65] == [f"<Z_{v:03d}>" for v in images[i].ravel()]


def test_digits_loader_target_is_class_token_at_cls(digits_dir):
    _, labels = tiny_cls.load_digits()
    _, val = tiny_cls.stratified_split(labels, 0.2, tiny_cls.SEED)
    assert_one_target_at_cls(digits_dir, "val", labels[val], block_size=68)
    # a block shorter than the example cuts its start in the loader, never the tail
    assert_one_target_at_cls(digits_dir, "val", labels[val], block_size=20)


# ----------------------------------------------------------------------------- JSONL

VOCAB = ["<PAD>", "<IMG>", "</IMG>", "<CLS>", "<EOS>", "<Z_000>", "<Z_001>", "<Z_002>"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def jsonl_files(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"tokens": "<IMG> <Z_000> <Z_001> </IMG> <CLS> <CLS> <EOS>", "label": 3},     # old tail
        {"tokens": "<IMG> <Z_002> <Z_777> <Z_001> </IMG> <CLS> <CLS_5> <EOS>", "label": 5},
        {"tokens": "<IMG> " + "<Z_001> " * 30 + "<Z_002> </IMG> <CLS> <CLS> <EOS>", "label": 9},
        "",
        {"tokens": "<IMG> <Z_001> </IMG> <CLS> <CLS_2> <EOS>", "label": 1},           # label wins
    ])
    val = write_jsonl(tmp_path / "val.jsonl", [
        {"tokens": "<IMG> <Z_000> <Z_999> </IMG> <CLS> <CLS> <EOS>", "label": 0},
        {"tokens": "<IMG> <Z_001> <Z_002> <Z_000> <Z_001>", "label": 7},              # no tail
    ])
    return str(vocab), train, val


def test_jsonl_fixes_tails_unknowns_vocab_and_truncates(tmp_path, monkeypatch):
    vocab, train, val = jsonl_files(tmp_path)
    data_dir = prepare(tmp_path, monkeypatch, "--jsonl", train, "--vocab", vocab,
                       "--val_jsonl", val, "--max_length", "12", "--name", "j")
    meta, tok = load(data_dir)
    assert tok.tokens[:len(VOCAB)] == VOCAB  # the user's ids are kept
    assert {"<UNK>", *meta["class_tokens"]} <= set(tok.special_tokens)
    assert meta["source"]["added_tokens"] == ["<UNK>"] + meta["class_tokens"]
    assert meta["codebook"]["kind"] == "none" and meta["example_length"] == 12
    src = meta["source"]
    assert (src["unknown_tokens"], src["fixed_tails"], src["truncated"]) == (2, 5, 1)
    assert src["label_conflicts"] == 1

    train_ex = examples(data_dir, "train")
    assert [w for w, _ in train_ex][0] == "<IMG> <Z_000> <Z_001> </IMG> <CLS> <CLS_3> <EOS>".split()
    assert train_ex[1][0][1:4] == ["<Z_002>", "<UNK>", "<Z_001>"]
    long_words = train_ex[2][0]  # 36 tokens cut from the left to 12: the tail survives
    assert long_words == ["<Z_001>"] * 7 + ["<Z_002>", "</IMG>", "<CLS>", "<CLS_9>", "<EOS>"]
    assert train_ex[3][0][-2] == "<CLS_1>"
    val_ex = examples(data_dir, "val")
    assert val_ex[1][0] == "<IMG> <Z_001> <Z_002> <Z_000> <Z_001> </IMG> <CLS> <CLS_7> <EOS>".split()
    for (words, mask), label in zip(train_ex + val_ex, [3, 5, 9, 1, 0, 7]):
        assert mask.tolist() == [0] * (len(words) - 2) + [1, 0]
        assert words[-4:] == ["</IMG>", "<CLS>", f"<CLS_{label}>", "<EOS>"]

    lengths = assert_one_target_at_cls(data_dir, "train", [3, 5, 9, 1])
    assert len(set(lengths)) > 1  # mixed lengths, so padding was really exercised


def test_read_jsonl_with_a_checkpoint_tokenizer(tmp_path, monkeypatch):
    """What sample.py --classify --jsonl does: encode a file with an existing tokenizer."""
    vocab, train, val = jsonl_files(tmp_path)
    data_dir = prepare(tmp_path, monkeypatch, "--jsonl", train, "--vocab", vocab, "--val_jsonl",
                       val)
    _, tok = load(data_dir)
    seqs, labels = tiny_cls.read_token_examples(val, tok)
    assert labels == [0, 7]
    assert tok.decode(seqs[0]).split() == "<IMG> <Z_000> <UNK> </IMG> <CLS> <CLS_0> <EOS>".split()


@pytest.mark.parametrize("line, problem", [
    ('{"tokens": "<IMG> <Z_000> </IMG>", "label": 1', "not valid JSON"),
    ('{"tokens": "<IMG> <Z_000> </IMG>"}', '"tokens" and "label"'),
    ('{"tokens": "<IMG> <Z_000> </IMG>", "label": "1"}', "must be an integer"),
    ('{"tokens": "<IMG> <Z_000> </IMG>", "label": 10}', "outside 0..9"),
    ('{"tokens": "<IMG> </IMG> <CLS> <CLS> <EOS>", "label": 1}', "no image tokens"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, problem):
    vocab, _, _ = jsonl_files(tmp_path)
    good = '{"tokens": "<IMG> <Z_000> </IMG> <CLS> <CLS> <EOS>", "label": 1}'
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line])
    tok, _ = tiny_cls.load_vocab(vocab)
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{problem}"):
        tiny_cls.read_token_examples(path, tok)


def test_jsonl_split_is_stratified_and_vocab_ids_checked(tmp_path, monkeypatch):
    vocab, _, _ = jsonl_files(tmp_path)
    rows = [{"tokens": f"<IMG> <Z_00{k % 3}> </IMG> <CLS> <CLS> <EOS>", "label": k % 5}
            for k in range(50)]
    data_dir = prepare(tmp_path, monkeypatch, "--jsonl", write_jsonl(tmp_path / "a.jsonl", rows),
                       "--vocab", vocab)
    counts = tokenizer.load_meta(data_dir)["source"]["counts"]
    assert counts["val"]["classes"] == [2] * 5 + [0] * 5
    assert counts["train"]["classes"] == [8] * 5 + [0] * 5
    bad = tmp_path / "gap.json"
    bad.write_text(json.dumps({"<IMG>": 0, "<Z_000>": 2}))
    with pytest.raises(DataError, match="gap.json: ids must be exactly 0..1"):
        tiny_cls.load_vocab(str(bad))


# ----------------------------------------------------------------------------- MNIST idx files

def write_idx(path, array, magic, compress):
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)
    return str(path)


def blocky_idx_dir(tmp_path):
    """8x8 train images of whole 2x2 blocks, each all-0 or all-255 (so every 2x2 train patch is
    one of two vectors), and val images of a constant 200 that no train patch resembles.
    Train files are gzipped, t10k plain."""
    rng = np.random.default_rng(0)
    train = np.kron(rng.integers(0, 2, (40, 4, 4)), np.ones((2, 2))) * 255
    val = np.full((6, 8, 8), 200)
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix, images, compress in (("train", train, True), ("t10k", val, False)):
        ext = ".gz" if compress else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", images, 2051, compress)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(len(images)) % 10, 2049,
                  compress)
    return str(d), train.astype(np.uint8), val.astype(np.uint8)


def test_idx_reader_plain_gz_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for compress in (False, True):
        path = write_idx(tmp_path / f"x{compress}", images, 2051, compress)
        assert (tiny_cls.read_idx(path, 2051) == images).all()
    labels = write_idx(tmp_path / "labels", np.arange(5), 2049, False)
    assert tiny_cls.read_idx(labels, 2049).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="labels: bad idx magic number 2049 .expected 2051"):
        tiny_cls.read_idx(labels, 2051)
    short = tmp_path / "short"
    short.write_bytes(open(tmp_path / "xFalse", "rb").read()[:-3])
    with pytest.raises(DataError, match="short: header promises shape \\[2, 3, 4\\]"):
        tiny_cls.read_idx(str(short), 2051)
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        tiny_cls.load_mnist(str(tmp_path))


def test_kmeans_fit_on_train_only_and_encode_reproduces_bins(tmp_path, monkeypatch):
    mnist_dir, train, val = blocky_idx_dir(tmp_path)
    data_dir = prepare(tmp_path, monkeypatch, "--mnist_dir", mnist_dir, "--patch", "2",
                       "--codes", "2", "--augment", "2", "--max_shift", "1")
    meta, tok = load(data_dir)
    assert data_dir.endswith("tiny_cls_mnist") and meta["codebook"]["grid"] == [4, 4]
    assert meta["source"]["args"]["max_shift"] == 1  # the flag beats MNIST's default of 2
    codebook = load_codebook(os.path.join(data_dir, "codebook.npz"))
    # Fit on train only: the centroids are exactly the two train patches. Had the 200-valued
    # val patches been seen, the "ink" centroid would have moved towards them.
    centroids = sorted(codebook["centroids"].mean(1).tolist())
    assert centroids == [0.0, 1.0] and (codebook["centroids"] % 1 == 0).all()

    def codes_in_bins(split):
        return np.array([[int(w[3:6]) for w in words[1:-4]] for words, _ in examples(data_dir, split)])

    copies = tiny_cls.shift_copies(train, 2, 1, tiny_cls.SEED)
    expected_train = encode_images(np.concatenate([train, copies]), codebook)
    assert (codes_in_bins("train") == expected_train).all()  # originals, then 2 shifted copies
    assert (codes_in_bins("train")[:40] == encode_images(train, codebook)).all()
    assert (codes_in_bins("val") == encode_images(val, codebook)).all()  # not augmented
    assert meta["source"]["counts"]["val"]["examples"] == 6
    for (words, mask), label in zip(examples(data_dir, "val"), np.arange(6) % 10):
        assert_layout(words, mask, label, n_codes=16)


def test_shift_copies_are_distinct_nonzero_shifts():
    image = np.zeros((1, 5, 5), dtype=np.uint8)
    image[0, 2, 2] = 7
    copies = tiny_cls.shift_copies(image, 8, 1, seed=3)
    spots = {tuple(np.argwhere(c)[0]) for c in copies}
    assert len(spots) == 8 and (2, 2) not in spots and all(c.sum() == 7 for c in copies)


def test_mnist_shared_files(tmp_path, monkeypatch):
    mnist = shared_path("data", "mnist")
    data_dir = prepare(tmp_path, monkeypatch, "--mnist_dir", mnist, "--codes", "16", "--augment", "0")
    meta, _ = load(data_dir)
    labels = {s: tiny_cls.read_idx(tiny_cls.find_idx(mnist, f"{p}-labels-idx1-ubyte"), 2049)
              for s, p in (("train", "train"), ("val", "t10k"))}
    assert meta["codebook"]["grid"] == [7, 7] and meta["example_length"] == 54
    for split, n in (("train", 6000), ("val", 2000)):
        got = examples(data_dir, split)
        assert len(got) == n == len(labels[split])
        for (words, mask), label in zip(got[:50], labels[split]):
            assert_layout(words, mask, label, n_codes=49)
