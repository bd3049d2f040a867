"""
Image codebooks for prepare/tiny_cls.py (a helper module, not a script): turn images into the
codes that become <Z_...> tokens, and back the same way for new images.

  levels  one code per pixel: its intensity rounded to one of L levels.
  kmeans  one code per non-overlapping PxP patch: the nearest of K centroids fit by k-means
          (k-means++ seeding, fixed seed) on the train images only.
Both may average-pool FxF pixel blocks first. A codebook is a dict of plain values and arrays,
saved as data/<name>/codebook.npz beside the bins:

    codebook = load_codebook("data/tiny_cls_mnist/codebook.npz")
    codes = encode_images(images, codebook)  # (N, H, W) -> (N, T) ints; token <Z_k> is code k
"""
import os

import numpy as np

SEED = 1337


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
