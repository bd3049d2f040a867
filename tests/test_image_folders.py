"""tiny_cls on users' image files: prepare/tiny_cls.py --image_dir (both folder layouts, odd and
broken files, class names that are any strings, the seeded stratified split), the one
preprocessing path shared by prepare, sample.py --image and the server, class names in every
report, and the classification head (cls_head = "lm" | "mlp")."""
import base64
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

import classify
import images
import tokenizer
import train
from conftest import ROOT, run_script
from data import DataError, Examples
from model import GPT, GPTConfig
from images import image_codebook, image_pixels, read_image
from prepare import tiny_cls

CLASSES = ["cat", "class with space", "狗"]  # sorted: class k is CLASSES[k]
CONFIG = os.path.join(ROOT, "config", "tiny_cls_images.py")
# a 1-layer model for a few seconds of training on one thread
TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=16",
        "--max_iters=60", "--warmup_iters=5", "--eval_interval=30", "--eval_iters=2",
        "--log_interval=30"]
SMALL = ["--image_size", "12", "--codes", "16"]  # 3x3 codes of 4x4 patches: short examples


def bar(k: int, i: int, size=(28, 28)) -> np.ndarray:
    """Class k's picture: a light bar on a dark ground, its row band set by k, moved a little by i."""
    h, w = size
    a = np.zeros(size, np.uint8)
    top = (k * h) // len(CLASSES) + i % 2
    a[top:top + max(1, h // 4), w // 6 + i % 3:w - w // 6] = 230
    return a


def save(a: np.ndarray, path: str, fmt: str | None = None) -> str:
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, fmt)
    return path


def write_split(folder: str, n: int, offset: int = 0) -> list[str]:
    """n images per class in folder/<class>/, as PNG, JPEG and BMP in turn."""
    paths = []
    for k, name in enumerate(CLASSES):
        for i in range(n):
            ext = ("png", "jpg", "bmp")[i % 3]
            paths.append(save(bar(k, i + offset), os.path.join(folder, name, f"{i:03d}.{ext}")))
    return paths


def prepare(tmp_path, monkeypatch, *argv) -> str:
    monkeypatch.chdir(tmp_path)
    return os.path.join(tmp_path, tiny_cls.main(list(argv)))


def bins(data_dir: str, split: str) -> list[list[int]]:
    ids = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16).astype(int)
    starts = np.fromfile(os.path.join(data_dir, f"{split}.idx"), dtype=np.uint64).astype(int)
    return [ids[s:e].tolist() for s, e in zip(starts, np.append(starts[1:], len(ids)))]


# ----------------------------------------------------------------------------- layouts

def test_split_layout_names_any_string_and_odd_files(tmp_path, monkeypatch):
    from PIL import Image
    root = tmp_path / "imgs"
    write_split(root / "train", 6)
    write_split(root / "val", 2, offset=1)
    cat = root / "train" / "cat"
    rgba = np.zeros((28, 28, 4), np.uint8)  # dark strokes on a transparent ground
    rgba[8:12, 4:24] = (0, 0, 0, 255)
    save(rgba, str(cat / "rgba.png"))
    save((bar(0, 0).astype(np.uint16) * 257), str(cat / "sixteen_bit.png"))
    Image.fromarray(bar(0, 1)).convert("P").save(cat / "palette.png")
    save(np.full((1, 1), 255, np.uint8), str(cat / "tiny.bmp"))
    big = np.zeros((2400, 3000), np.uint8)  # larger than MAX_SIDE: reduced before anything else
    big[:600, 500:2500] = 255
    save(big, str(cat / "huge.png"))
    (cat / "notes.txt").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\0")
    (root / "test").mkdir()  # beside train/ and val/: left out, and said so
    data_dir = prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL)

    meta = tokenizer.load_meta(data_dir)
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 3
    assert meta["class_tokens"] == ["<CLS_0>", "<CLS_1>", "<CLS_2>"]
    counts = meta["source"]["counts"]
    assert counts["train"]["classes"] == [3 * 11, 3 * 6, 3 * 6]  # 6 + 5 odd files; 2 shifted copies
    assert counts["val"]["classes"] == [2, 2, 2]
    assert meta["source"]["not_images"] == 1 and meta["source"]["ignored_folders"] == ["test"]
    book = meta["codebook"]
    assert (book["image_shape"], book["fit"], book["polarity"], book["max_value"]) == ([12, 12], "pad", "auto", 255)
    saved = np.load(os.path.join(data_dir, "codebook.npz"))
    assert np.array_equal(image_codebook(meta, "/nonexistent")["centroids"], saved["centroids"])
    for seq in bins(data_dir, "train") + bins(data_dir, "val"):
        assert len(seq) == 9 + 5


def test_unsplit_layout_split_is_stratified_seeded_and_reproducible(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    write_split(root, 10)
    a = prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL, "--name", "a",
                "--val_fraction", "0.3")
    b = prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL, "--name", "b",
                "--val_frac", "0.3")
    c = prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL, "--name", "c",
                "--val_frac", "0.3", "--seed", "7")
    meta = tokenizer.load_meta(a)
    assert meta["source"]["counts"]["val"]["classes"] == [3, 3, 3]  # round(10 x 0.3) of each
    assert meta["source"]["counts"]["train"]["classes"] == [21, 21, 21]  # 7 + 2 shifted copies
    for split in ("train", "val"):
        assert bins(a, split) == bins(b, split)
    assert bins(a, "val") != bins(c, "val")  # another seed draws other images


def test_bad_files_error_names_them_or_are_skipped_and_counted(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    write_split(root, 6)
    broken = root / "狗" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match="broken.png.*--skip_bad"):
        prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL)
    assert not os.path.exists(tmp_path / "data" / "tiny_cls_images")  # nothing half-written
    truncated = root / "cat" / "cut.jpg"
    save(bar(0, 0), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:60])
    data_dir = prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL, "--skip_bad")
    source = tokenizer.load_meta(data_dir)["source"]
    assert source["bad_files"] == 2 and sorted(map(os.path.basename, source["bad_examples"])) == ["broken.png", "cut.jpg"]


@pytest.mark.parametrize("make, problem", [
    (lambda root: os.makedirs(root / "train"), "no class folders"),
    (lambda root: (write_split(root / "train", 3), os.makedirs(root / "train" / "empty")), "empty: no image files"),
    (lambda root: (write_split(root / "train", 3), save(bar(0, 0), str(root / "val" / "bird" / "a.png"))),
     "'bird' has no train folder"),
])
def test_layout_errors_name_the_folder(tmp_path, monkeypatch, make, problem):
    root = tmp_path / "imgs"
    make(root)
    with pytest.raises(DataError, match=problem):
        prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL)


def test_mnist_as_png_folders_gives_the_idx_paths_examples(tmp_path, monkeypatch):
    """prepare/mnist_to_png.py then --image_dir makes, per image, the very examples --mnist_dir
    makes (a per-pixel codebook, no shifted copies: nothing fit or drawn depends on order);
    the idx files keep file order, folders are read class by class, then mixed (seeded)."""
    from prepare import mnist_to_png
    from test_tiny_cls_prepare import write_idx
    rng = np.random.default_rng(0)
    images = np.zeros((2, 30, 28, 28), np.uint8)
    images[:, :, 4:24, 4:24] = rng.integers(0, 256, (2, 30, 20, 20))  # on MNIST's dark border
    labels = np.stack([rng.permutation(np.arange(30) % 10) for _ in range(2)])  # every class
    d = tmp_path / "mnist"
    d.mkdir()
    for i, prefix in enumerate(("train", "t10k")):
        write_idx(d / f"{prefix}-images-idx3-ubyte", images[i], 2051, False)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", labels[i], 2049, True)
    monkeypatch.chdir(tmp_path)
    png_dir = mnist_to_png.main(["--mnist_dir", str(d), "--out", str(tmp_path / "png")])
    flags = ["--codebook", "levels", "--augment", "0"]
    from_idx = prepare(tmp_path, monkeypatch, "--mnist_dir", str(d), *flags, "--name", "idx")
    from_png = prepare(tmp_path, monkeypatch, "--image_dir", png_dir, *flags, "--name", "png")
    for i, split in enumerate(("train", "val")):
        by_class = np.argsort(labels[i], kind="stable")[tiny_cls.mixed_order(30, tiny_cls.SEED)]
        assert [bins(from_idx, split)[j] for j in by_class] == bins(from_png, split)


# ----------------------------------------------------------------------------- one image -> pixels

def test_image_modes_become_the_same_pixels():
    """A picture saved as 8-bit gray, 16-bit gray, palette, RGB JPEG-free RGB and dark-on-
    transparent RGBA is the same ink; letterboxing keeps the aspect ratio."""
    from PIL import Image
    book = {"image_shape": [28, 28], "fit": "pad", "polarity": "auto", "max_value": 255}
    gray = bar(1, 0)

    def pixels(img):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return image_pixels(read_image(buf.getvalue()), book)

    want = pixels(Image.fromarray(gray))
    assert np.array_equal(want, gray)  # 28x28 at 28x28: untouched
    assert np.array_equal(pixels(Image.fromarray(gray.astype(np.uint16) * 257)), want)
    assert np.array_equal(pixels(Image.fromarray(gray).convert("P")), want)
    assert np.array_equal(pixels(Image.fromarray(gray).convert("RGB")), want)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = gray  # black ink, as opaque as the bar is light
    assert np.abs(pixels(Image.fromarray(rgba)) - want).max() <= 1
    wide = np.zeros((10, 20), np.uint8)
    wide[:, :] = 255
    wide[0, :] = wide[-1, :] = wide[:, 0] = wide[:, -1] = 0  # a dark border: light is ink
    out = pixels(Image.fromarray(wide))
    assert out[:7].max() == 0 and out[21:].max() == 0 and out[10:18, 4:24].min() == 255
    assert pixels(Image.fromarray(np.full((1, 1), 9, np.uint8))).shape == (28, 28)


def test_a_training_image_and_a_classified_one_get_the_same_tokens(tmp_path, monkeypatch):
    """Every val image (never augmented) read by sample.py's path and by the server's gives the
    very tokens prepare wrote for it."""
    serve = pytest.importorskip("serve")
    from types import SimpleNamespace
    root = tmp_path / "imgs"
    write_split(root / "train", 6)
    val = write_split(root / "val", 3, offset=1)  # in prepare's order: classes, then files, sorted
    data_dir = prepare(tmp_path, monkeypatch, "--image_dir", str(root), *SMALL, "--name", "same")
    meta = tokenizer.load_meta(data_dir)
    tok = tokenizer.from_meta(meta)
    book = image_codebook(meta, data_dir)
    served = SimpleNamespace(name="same", meta=meta, tok=tok, train_config={"dataset": data_dir},
                             model=SimpleNamespace(config=SimpleNamespace(block_size=64)))
    val = [val[i] for i in tiny_cls.mixed_order(len(val), tiny_cls.SEED)]  # the order written
    for path, example in zip(val, bins(data_dir, "val")):
        ids = images.image_ids(tok, book, image_pixels(read_image(path), book), 64)
        assert ids == example[:-2]  # the example without <CLS_k> <EOS>
        if path.endswith(".png"):
            with open(path, "rb") as f:
                assert serve.image_input(served, base64.b64encode(f.read()).decode())[0] == ids


# ----------------------------------------------------------------------------- train and classify

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An image-folder dataset and two short runs on it, one per head: {"data", "lm", "mlp", "root"}."""
    root = tmp_path_factory.mktemp("image_folders")
    write_split(str(root / "imgs" / "train"), 12)
    write_split(str(root / "imgs" / "val"), 3, offset=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        data_dir = os.path.join(root, tiny_cls.main(["--image_dir", str(root / "imgs"), *SMALL]))
        out = {"data": data_dir, "root": root}
        for head, extra in (("lm", []), ("mlp", ["--cls_head=mlp", "--prompt_loss_weight=0"])):
            out[head] = os.path.join(root, "weight", head)
            out[head + "_summary"] = train.main([CONFIG, *TINY, *extra, f"--dataset={data_dir}",
                                                 f"--out_dir={out[head]}"])
        yield out


def logged(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_both_heads_train_and_report_class_names(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for head in ("lm", "mlp"):
        evals = [r for r in logged(runs[head]) if "val_acc" in r]
        assert evals and evals[-1]["val_loss"] < evals[0]["val_loss"]
        r = run_script("sample.py", f"--out_dir={runs[head]}", "--classify")
        with open(os.path.join(runs[head], "cls_eval.json"), encoding="utf-8") as f:
            report = json.load(f)
        assert list(report["per_class"]) == CLASSES and report["class_names"] == CLASSES
        assert {"accuracy", "n", "per_class", "confusion", "mean_confidence"} <= set(report)
        assert report["n"] == 9 and np.array(report["confusion"]).shape == (3, 3)
        assert "class with space" in r.stdout and "狗" in r.stdout
    ckpt = torch.load(os.path.join(runs["mlp"], "best.pt"), weights_only=True)
    assert ckpt["model_config"]["cls_head"] == "mlp" and ckpt["model_config"]["n_class"] == 3
    assert ckpt["tokenizer"]["class_names"] == CLASSES
    assert ckpt["model"]["cls_ids"].tolist() == classify.class_token_ids(ckpt["tokenizer"])


def test_sample_classifies_one_image_and_a_folder(runs, tmp_path, monkeypatch):
    """The run folder alone is enough (the codebook travels in the checkpoint): the dataset is
    moved away first. A folder gets a line per image and cls_images.csv in the run folder."""
    monkeypatch.chdir(tmp_path)
    shutil.move(runs["data"], runs["data"] + ".moved")
    try:
        one = os.path.join(runs["root"], "imgs", "val", "狗", "000.png")
        r = run_script("sample.py", f"--out_dir={runs['mlp']}", "--classify", f"--image={one}")
        path, name, p = r.stdout.strip().split("\t")
        assert path == one and name in CLASSES and 0 < float(p) <= 1
        assert "the model read it as above" in r.stderr  # the grid it saw, and its training images
        folder = os.path.join(runs["root"], "imgs", "val")
        r = run_script("sample.py", f"--out_dir={runs['lm']}", "--classify", f"--image={folder}")
        assert "accuracy" in r.stdout and "cls_images.csv" in r.stdout
        with open(os.path.join(runs["lm"], "cls_images.csv"), encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 9 and {row["true_class"] for row in rows} == set(CLASSES)
        assert all(row["class"] in CLASSES for row in rows)
    finally:
        shutil.move(runs["data"] + ".moved", runs["data"])


def test_sample_image_errors_name_the_file(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    r = run_script("sample.py", f"--out_dir={runs['lm']}", "--classify", f"--image={bad}", check=False)
    assert r.returncode == 1 and "bad.png" in r.stderr and "Traceback" not in r.stderr
    folder = tmp_path / "some"
    folder.mkdir()
    shutil.copy(bad, folder / "bad.png")
    save(bar(2, 0), str(folder / "good.png"))
    r = run_script("sample.py", f"--out_dir={runs['lm']}", "--classify", f"--image={folder}", "--skip_bad")
    assert "good.png" in r.stdout and "1 unreadable skipped" in r.stdout


def test_server_answers_with_class_names(runs):
    pytest.importorskip("fastapi")
    from test_serve import LiveServer
    server = LiveServer([runs["mlp"]])
    try:
        card = server.http.get("/v1/models").json()["data"][0]
        assert card["classes"] == CLASSES
        with open(os.path.join(runs["root"], "imgs", "val", "cat", "000.png"), "rb") as f:
            image = base64.b64encode(f.read()).decode()
        r = server.http.post("/v1/classify", json={"image": image}).json()
        assert r["class_name"] == CLASSES[r["class"]] and len(r["probabilities"]) == 3
    finally:
        server.close()


# ----------------------------------------------------------------------------- the mlp head

def test_mlp_head_loss_is_one_target_per_example():
    """train.py's Objective sums the head's cross-entropy over the class targets only, and
    count() gives the training loop one per example, whatever else y holds."""
    from train import Objective
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=12, n_layer=1, n_head=2, n_embd=16,
                          cls_head="mlp", n_class=3))
    model.cls_ids.copy_(torch.tensor([9, 10, 11]))
    x = torch.randint(0, 8, (2, 6))
    x[0, 3] = x[1, 5] = 8  # <CLS>
    y = torch.full((2, 6), -1)
    y[0, 3], y[1, 5] = 11, 9  # classes 2 and 0, at <CLS>
    y[0, 1] = 4  # a next-token target: not the head's business
    loss, _ = Objective(model, loss_only=False)(x, y)
    h = model.body(x)
    logits = model.cls_mlp(torch.stack([h[0, 3], h[1, 5]]))
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]), reduction="sum").item(), rel=1e-5)
    assert Objective(model, loss_only=False).count(y).item() == 2
    assert Objective(model, loss_only=True)(x, y)[0].item() == pytest.approx(loss.item())
    probs = classify.class_probs(model, x, cls_id=8, class_ids=[9, 10, 11])
    assert torch.allclose(probs, torch.softmax(logits, -1), atol=1e-6)


def test_mlp_head_config_errors(tmp_path):
    from settings import ConfigError, load_config
    with pytest.raises(ConfigError, match="prompt_loss_weight"):
        load_config(train.TrainConfig, ["--cls_head=mlp", "--prompt_loss_weight=0.1"])
    with pytest.raises(ConfigError, match="n_class"):
        GPT(GPTConfig(block_size=8, vocab_size=12, n_layer=1, n_head=2, n_embd=16, cls_head="mlp"))
