"""
An image as the model reads it: the token format of an example (<IMG> codes </IMG> <CLS>
<CLS_k> <EOS>), the codebooks that turn pixels into codes (<Z_k> is code k), and the one way an
image file becomes pixels. prepare/tiny_cls.py writes datasets with it; classify, sample.py
--classify and the server encode new images and token lists with the same functions.

  levels  one code per pixel: its intensity rounded to one of L levels.
  kmeans  one code per non-overlapping PxP patch: the nearest of K centroids fit by k-means
          (k-means++ seeding, fixed seed) on the train images only.
Both may average-pool FxF pixel blocks first. A codebook is a dict of plain values and arrays,
saved as data/<name>/codebook.npz beside the bins:

    codebook = load_codebook("data/tiny_cls_mnist/codebook.npz")
    codes = encode_images(images, codebook)  # (N, H, W) -> (N, T) ints; token <Z_k> is code k

It also holds the one way an image file becomes pixels (read_image, image_pixels): prepare's
--image_dir, `sample.py --image` and the server's drawings all go through it, with the settings
the codebook records (size, fit, polarity), so a training image and a classified one cannot
be preprocessed differently.
"""
import json
import os

import numpy as np

import tokenizer
from data import DataError, decode_utf8, open_input

SEED = 1337
NUM_CLASSES = 10
PAD, UNK, IMG, END_IMG, CLS, EOS = "<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"
MARKERS = [PAD, UNK, IMG, END_IMG, CLS, EOS]
# How far the ink's bounding box reaches across the image in each training set: the UCI
# digits were scaled to fill their 32x32 box (then pooled to 8x8); MNIST fits each digit
# in 20 of 28 pixels. fit="ink" codebooks record theirs; older ones are looked up here.
INK_FILL = {(8, 8): 1.0, (28, 28): 20 / 28}
MAX_SIDE = 2048  # larger images are box-reduced first, so a photo never costs gigabytes
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def pool_images(images: np.ndarray, pool: int, max_value: float) -> np.ndarray:
    """float32 images in [0, 1], averaged over pool x pool blocks."""
    x = images.astype(np.float32) / max_value
    N, H, W = x.shape
    if H % pool or W % pool:
        raise ValueError(f"--pool {pool} does not divide the {H}x{W} images")
    return x.reshape(N, H // pool, pool, W // pool, pool).mean(axis=(2, 4))


def patches(x: np.ndarray, patch: int) -> np.ndarray:
    """(N, H, W) -> (N, T, patch*patch): non-overlapping patches in raster order."""
    N, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"--patch {patch} does not divide the {H}x{W} (pooled) images")
    gh, gw = H // patch, W // patch
    return x.reshape(N, gh, patch, gw, patch).transpose(0, 1, 3, 2, 4).reshape(N, gh * gw, -1)


def nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean) for each row of x. In float64 so that
    the same row gets the same code however the rows are batched."""
    c_t = np.ascontiguousarray(centroids.T, dtype=np.float64)  # contiguous: 10x faster BLAS
    c2 = (c_t ** 2).sum(0)
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), chunk):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 does not change the argmin
        d = x[i:i + chunk].astype(np.float64) @ c_t
        d *= -2
        d += c2
        out[i:i + chunk] = np.argmin(d, axis=1)
    return out


def kmeans_plus_plus(x: np.ndarray, k: int, rng) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new centre is drawn with
    probability proportional to its squared distance from the nearest centre so far."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centres)


def kmeans(x: np.ndarray, k: int, seed: int = SEED, iters: int = 30,
           max_points: int = 100_000) -> np.ndarray:
    """(k, D) float32 centroids of the rows of x by Lloyd's algorithm, on a fixed random sample
    of at most max_points rows (the centroids hardly move with more; the time grows)."""
    rng = np.random.default_rng(seed)
    if len(x) > max_points:
        x = x[np.sort(rng.choice(len(x), max_points, replace=False))]
    if k > len(x):
        raise ValueError(f"--codes {k} is more than the {len(x)} train patches")
    x = x.astype(np.float64)
    centres = kmeans_plus_plus(x, k, rng)
    assign = None
    for _ in range(iters):
        new_assign = nearest(x, centres)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        counts = np.bincount(assign, minlength=k)
        for d in range(x.shape[1]):
            centres[:, d] = np.bincount(assign, weights=x[:, d], minlength=k) / np.maximum(counts, 1)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # re-seed an empty cluster at the worst-fit points
            err = ((x - centres[assign]) ** 2).sum(1)
            centres[empty] = x[np.argsort(-err)[:len(empty)]]
    return centres.astype(np.float32)


def fit_codebook(train_images: np.ndarray, kind: str, max_value: float, levels: int = 17,
                 patch: int = 4, codes: int = 256, pool: int = 1, seed: int = SEED) -> dict:
    """A codebook for images shaped like train_images; k-means sees only these images."""
    x = pool_images(train_images, pool, max_value)
    codebook = {"kind": kind, "max_value": max_value, "pool": pool,
                "image_shape": list(train_images.shape[1:])}
    if kind == "levels":
        codebook.update(levels=levels, patch=1, n_codes=levels)
    elif kind == "kmeans":
        p = patches(x, patch)
        codebook.update(patch=patch, n_codes=codes,
                        centroids=kmeans(p.reshape(-1, p.shape[-1]), codes, seed))
    else:
        raise ValueError(f"unknown codebook kind {kind!r} (levels or kmeans)")
    codebook["grid"] = [x.shape[1] // codebook["patch"], x.shape[2] // codebook["patch"]]
    return codebook


def encode_images(images: np.ndarray, codebook: dict) -> np.ndarray:
    """(N, H, W) images -> (N, T) int64 codes in [0, n_codes), T = grid rows * cols."""
    images = np.asarray(images)
    if list(images.shape[1:]) != list(codebook["image_shape"]):
        raise ValueError(f"images are {list(images.shape[1:])} but the codebook was fit on "
                         f"{list(codebook['image_shape'])}")
    x = pool_images(images, codebook["pool"], codebook["max_value"])
    if codebook["kind"] == "levels":
        top = codebook["levels"] - 1
        return np.clip(np.rint(x * top), 0, top).astype(np.int64).reshape(len(x), -1)
    p = patches(x, codebook["patch"])
    return nearest(p.reshape(-1, p.shape[-1]), codebook["centroids"]).reshape(len(x), -1)


def save_codebook(path: str, codebook: dict) -> None:
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **{key: np.asarray(value) for key, value in codebook.items()})
    os.replace(path + ".tmp", path)


def load_codebook(path: str) -> dict:
    """The codebook dict that fit_codebook made, as saved in data/<name>/codebook.npz."""
    with np.load(path) as f:
        codebook = {key: f[key].item() if f[key].ndim == 0 else f[key] for key in f.files}
    for key in ("image_shape", "grid"):
        codebook[key] = codebook[key].tolist()
    return codebook


def codebook_meta(codebook: dict) -> dict:
    """The codebook as plain JSON for meta.json (and so for every checkpoint trained on it):
    k-means centroids as base64 float32 bytes, exact and compact, so that a run folder alone
    can encode new images."""
    import base64
    meta = {k: v for k, v in codebook.items() if k != "centroids"}
    if "centroids" in codebook:
        c = np.ascontiguousarray(codebook["centroids"], dtype="<f4")
        meta.update(centroids_b64=base64.b64encode(c.tobytes()).decode("ascii"),
                    centroids_shape=list(c.shape))
    return meta


# ----------------------------------------------------------------------------- image files

class ImageError(ValueError):
    """An image that cannot be read; callers add the file name (or the request field)."""


def read_image(source):
    """A PIL image from a path or bytes, decoded now (so a corrupt file fails here), turned
    upright by its EXIF orientation. Any format Pillow reads: PNG, JPEG, BMP, GIF, WebP, TIFF.
    A file that cannot be opened is an OSError; one that is not a readable image, ImageError."""
    import io
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not isinstance(source, bytes):
        with open(source, "rb") as f:
            source = f.read()
    try:
        img = Image.open(io.BytesIO(source))
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read (PNG, JPEG, BMP, ...)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large to decode safely ({e})") from None
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"a broken {img.format or 'image'} file ({e})") from None


def image_ink(img, polarity: str = "auto") -> np.ndarray:
    """A PIL image of any mode -> ink in [0, 1], (H, W). Lightness is gray-weighted RGB with
    transparency over a white ground; 16-bit images keep their range. polarity says which side
    is ink: dark (strokes on paper), light (MNIST, photos as they are), or auto: whichever the
    border is not, so dark-on-light drawings and light-on-dark digits both become ink."""
    from PIL import Image
    if img.mode in SIXTEEN_BIT:
        img = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0)
    elif img.mode != "F":
        img = img.convert("RGBA")
    if max(img.size) > MAX_SIDE:
        img = img.reduce(-(-max(img.size) // MAX_SIDE))  # box average, ceil factor
    if img.mode == "F":
        light = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    else:
        rgba = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 4)
        light = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        light = light * rgba[..., 3] + (1.0 - rgba[..., 3])  # transparent is the (white) ground
    if polarity == "light":
        return light
    ink = 1.0 - light
    if polarity == "auto":
        border = np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
        return 1.0 - ink if border.mean() > 0.5 else ink
    return ink


def resize(x: np.ndarray, shape) -> np.ndarray:
    """(h, w) floats resized to shape: box averages when shrinking, bilinear when enlarging."""
    from PIL import Image
    if tuple(x.shape) == tuple(shape):
        return x
    shrink = x.shape[0] >= shape[0] and x.shape[1] >= shape[1]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(x.astype(np.float32)).resize((shape[1], shape[0]), method))


def fit_ink(ink: np.ndarray, shape, fill: float) -> np.ndarray:
    """Crop ink to its bounding box, centre it in a square that it fills a fraction fill of,
    and average it down to shape: (h, w) in [0, 1]. A blank image stays blank."""
    from PIL import Image
    rows, cols = np.nonzero(ink > 0.1)
    if len(rows) == 0:
        return np.zeros(shape, dtype=np.float32)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    side = int(np.ceil(max(crop.shape) / fill))
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    small = Image.fromarray(square).resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.clip(np.asarray(small), 0.0, 1.0)


def fit_pad(ink: np.ndarray, shape) -> np.ndarray:
    """Scale ink to fit inside shape keeping its aspect ratio and centre it on a blank
    ground: (h, w) in [0, 1]. An image of exactly shape is left as it is."""
    H, W = shape
    scale = min(H / ink.shape[0], W / ink.shape[1])
    h, w = max(1, min(H, round(ink.shape[0] * scale))), max(1, min(W, round(ink.shape[1] * scale)))
    out = np.zeros(shape, dtype=np.float32)
    top, left = (H - h) // 2, (W - w) // 2
    out[top:top + h, left:left + w] = resize(ink, (h, w))
    return np.clip(out, 0.0, 1.0)


def image_pixels(img, codebook: dict) -> np.ndarray:
    """A PIL image -> (H, W) float pixels in 0..max_value (whole numbers), as the codebook's
    training images were made: its polarity, its fit ("pad": the whole image letterboxed;
    "ink": the strokes cropped and centred), its image_shape. Codebooks from before these keys
    were recorded are the digits' and MNIST's: auto polarity, ink fit, INK_FILL."""
    shape = tuple(codebook["image_shape"])
    ink = image_ink(img, codebook.get("polarity", "auto"))
    if codebook.get("fit", "ink") == "pad":
        fitted = fit_pad(ink, shape)
    else:
        fitted = fit_ink(ink, shape, codebook.get("ink_fill", INK_FILL.get(shape, 1.0)))
    return np.rint(fitted * codebook["max_value"])


def image_codebook(meta: dict, data_dir: str) -> dict:
    """The codebook that turns a classifier's images into tokens: from its tokenizer meta (a
    checkpoint's or a meta.json), where image datasets keep it whole; an older k-means dataset
    kept its centroids only in data_dir/codebook.npz. ValueError says what is missing."""
    book = dict(meta.get("codebook") or {})
    if book.get("kind") in (None, "none"):
        raise ValueError("this classifier was trained on tokenized JSONL, not images: it reads "
                         "tokens, not pictures")
    if "centroids_b64" in book:
        import base64
        raw = base64.b64decode(book.pop("centroids_b64"))
        book["centroids"] = np.frombuffer(raw, dtype="<f4").reshape(book.pop("centroids_shape"))
    elif book["kind"] == "kmeans":
        path = os.path.join(data_dir, book.get("file") or "codebook.npz")
        if not os.path.exists(path):
            raise ValueError(f"its k-means codebook ({path}) is not on this machine; run "
                             "prepare/tiny_cls.py for its dataset again")
        return load_codebook(path)
    return book


# ----------------------------------------------------------------------------- the token format

def class_token(k: int) -> str:
    return f"<CLS_{k}>"


def class_tokens(num_classes: int = NUM_CLASSES) -> list[str]:
    return [class_token(k) for k in range(num_classes)]


def code_token(i: int) -> str:
    return f"<Z_{i:03d}>"


def tail_ids(tok, label: int) -> list[int]:
    return [tok.stoi[END_IMG], tok.stoi[CLS], tok.stoi[class_token(label)], tok.stoi[EOS]]


def wrap_codes(tok, codes: list[int], block_size: int) -> list[int]:
    """Code token ids -> <IMG> codes </IMG> <CLS>, the prefix training examples have before
    their answer. ValueError when it is longer than the model reads."""
    ids = [tok.stoi[IMG]] + list(codes) + [tok.stoi[END_IMG], tok.stoi[CLS]]
    if len(ids) > block_size:
        raise ValueError(f"tokens: {len(ids)} tokens with the markers; the model reads at most "
                         f"{block_size}")
    return ids


def token_ids(tok, tokens: list, block_size: int) -> list[int]:
    """Ids or names of an image's tokens (a tail such as </IMG> <CLS> may be there or not) ->
    <IMG> codes </IMG> <CLS>, as training saw them. ValueError names the bad entry."""
    names = tok.tokens
    for i, t in enumerate(tokens):
        if isinstance(t, int) and not 0 <= t < len(names):
            raise ValueError(f"tokens.{i}: id {t} is outside this vocabulary (0..{len(names) - 1})")
        if isinstance(t, str) and t not in tok.stoi:
            raise ValueError(f"tokens.{i}: {t!r} is not in this vocabulary")
    words, _ = split_image([names[t] if isinstance(t, int) else t for t in tokens])
    if not words:
        raise ValueError("tokens: no image tokens before the </IMG> <CLS> tail")
    return wrap_codes(tok, [tok.stoi[w] for w in words], block_size)


def image_ids(tok, codebook: dict, pixels: np.ndarray, block_size: int) -> list[int]:
    """(H, W) pixels (image_pixels) -> <IMG> codes </IMG> <CLS>, encoded
    exactly as prepare/tiny_cls.py encodes a training image."""
    codes = encode_images(pixels[None], codebook)[0]
    first = tok.stoi[code_token(0)]
    return wrap_codes(tok, [first + int(c) for c in codes], block_size)


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


def read_token_examples(path: str, tok, max_length: int = 1024, num_classes: int = NUM_CLASSES,
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


# ----------------------------------------------------------------------------- image files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: str, stats: dict) -> list[str]:
    """Every image file under folder (any depth), sorted; hidden files are passed over and
    files without an image extension are counted in stats["not_images"]."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
            else:
                stats["not_images"] = stats.get("not_images", 0) + 1
    return found
