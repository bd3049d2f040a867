"""
Token bins on disk, and the batches read from them.

Layout of data/<name>/ (see DESIGN.md):
  <split>.bin       flat little-endian uint16 token ids
  <split>.idx       uint64 start offset of each example (example datasets only)
  <split>.mask.bin  uint8, 1 where the token is a training target (SFT, classification)
  meta.json         the tokenizer (tokenizer.py)
Two loaders: TokenWindows (random block_size windows, for pretraining on a token stream) and
Examples (whole examples, right-padded, with loss masks). Both open the memmap per batch so the
process never holds a split in memory, and both carry their sampling state for exact resume.
"""
import contextlib
import json
import os
import shutil

import numpy as np
import torch

from files import atomic_write

MAX_VOCAB = 65536  # uint16 ids


class DataError(ValueError):
    """Bad or missing data on disk; the message says which file and how to fix it."""


# ----------------------------------------------------------------------------- writing

class BinWriter:
    """Appends token ids to <path> as uint16, via a temp file renamed on close (atomic)."""

    def __init__(self, path: str, vocab_size: int, dtype=np.uint16):
        if dtype == np.uint16 and not vocab_size <= MAX_VOCAB:
            raise DataError(f"vocab_size {vocab_size} does not fit uint16 bins (max {MAX_VOCAB})")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.vocab_size, self.dtype = path, vocab_size, dtype
        self.f = open(path + ".tmp", "wb")
        self.count = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"{self.path}: token id {int(arr.max())} is outside the vocabulary "
                            f"(vocab_size {self.vocab_size})")
        self.f.write(arr.astype(self.dtype).tobytes())
        self.count += arr.size

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.path + ".tmp", self.path)


class ExampleWriter:
    """Writes one split of an example dataset: .bin, .idx and (if masks are given) .mask.bin."""

    def __init__(self, data_dir: str, split: str, vocab_size: int, with_mask: bool = False):
        base = os.path.join(data_dir, split)
        self.tokens = BinWriter(base + ".bin", vocab_size)
        self.masks = BinWriter(base + ".mask.bin", 2, np.uint8) if with_mask else None
        self.starts: list[int] = []
        self.idx_path = base + ".idx"
        self.n_targets = 0

    def add(self, ids, mask=None) -> None:
        if self.masks is not None:
            if mask is None or len(mask) != len(ids):
                raise DataError(f"{self.tokens.path}: every example needs a mask of its length")
            self.masks.write(mask)
            self.n_targets += int(np.sum(mask))
        self.starts.append(self.tokens.count)
        self.tokens.write(ids)

    def close(self) -> dict:
        self.tokens.close()
        if self.masks is not None:
            self.masks.close()
        np.asarray(self.starts, dtype=np.uint64).tofile(self.idx_path + ".tmp")
        os.replace(self.idx_path + ".tmp", self.idx_path)
        return {"examples": len(self.starts), "tokens": self.tokens.count,
                "targets": self.n_targets if self.masks is not None else self.tokens.count}


@contextlib.contextmanager
def building(out_dir: str):
    """Yield an empty folder to build a whole dataset in; when the block ends without an error it
    replaces out_dir, otherwise it is deleted and out_dir is left exactly as it was.

    A prepare script that writes into data/<name> directly and then fails leaves a dataset that
    is half old and half new, or empty bins beside a stale meta.json; one that builds aside and
    swaps at the end leaves either the old dataset or the new one, never a mix."""
    # realpath: when data/<name> is a link to another disk, build on that disk (a rename
    # cannot cross file systems) and swap the folder the link points to, keeping the link.
    target = os.path.realpath(out_dir)
    parent, name = os.path.split(target)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    for stale in (tmp, old):  # left by a killed run that had this process id
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:  # Ctrl-C too: never leave a half-built folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames, not one: os.replace cannot put a folder over a non-empty one. Between them
    # data/<name> is missing for an instant; the old copy is deleted only once the new is in.
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

PREPARE_HINT = {
    "shakespeare_char": "python prepare/shakespeare_char.py --input ../shared/data/tinyshakespeare.txt",
    "tiny_cls": "python prepare/tiny_cls.py",
    "tiny_cls_mnist": "python prepare/tiny_cls.py --mnist_dir ../shared/data/mnist --name tiny_cls_mnist",
}


def dataset_path(name: str) -> str:
    """data/<name>, or name itself if it is a path to a folder (whether or not it exists)."""
    return name if os.path.isdir(name) else os.path.join("data", name)


def dataset_dir(name: str) -> str:
    """dataset_path(name), checked to hold a prepared dataset."""
    path = dataset_path(name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        hint = PREPARE_HINT.get(os.path.basename(name.rstrip("/")),
                                f"python prepare/text.py --input YOUR_FILES --name {name}")
        raise DataError(f"dataset {name!r} not found (no {path}/meta.json). Make it with:\n  {hint}")
    return path


def check_tokens(data_dir: str, split: str, vocab_size: int) -> int:
    """Number of tokens in <split>.bin, after checking it is whole uint16 ids below vocab_size.
    The scan reads fixed-size chunks into a reused buffer rather than through a memmap, so a
    multi-GB file does not become resident memory."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise DataError(f"{path} is missing; re-run the prepare script for this dataset")
    size = os.path.getsize(path)
    if size % 2:
        raise DataError(f"{path} has {size} bytes, not a multiple of 2: it is not a uint16 token "
                        "file, or it was cut short. Re-run the prepare script.")
    if size == 0:
        raise DataError(f"{path} is empty; re-run the prepare script with more data")
    top = largest_id(path, size)
    if top >= vocab_size:
        raise DataError(f"{path} holds token id {top} but vocab_size is {vocab_size}: the bin and "
                        "meta.json (or the model's vocab_size) do not belong together")
    return size // 2


def largest_id(path: str, size: int) -> int:
    """The largest token id in a .bin. The scan reads fixed-size chunks into a reused buffer,
    not a memmap, so a multi-GB file never becomes resident memory; its result is kept beside
    the file (<split>.bin.max.json, keyed by size and mtime) because every process of every run
    would otherwise read the whole file again at start (16 passes over OpenWebText on 8 GPUs)."""
    stamp = {"size": size, "mtime_ns": os.stat(path).st_mtime_ns}
    try:
        with open(path + ".max.json") as f:
            cached = json.load(f)
        if {k: cached.get(k) for k in stamp} == stamp:
            return int(cached["max_id"])
    except (OSError, ValueError, KeyError):
        pass
    top, chunk = 0, 1 << 23
    with open(path, "rb") as f:
        while block := f.read(2 * chunk):
            top = max(top, int(np.frombuffer(block, dtype=np.uint16).max()))
    try:
        with atomic_write(path + ".max.json", "w") as f:
            json.dump({**stamp, "max_id": top}, f)
    except OSError:
        pass  # a read-only data folder: scan again next time
    return top


def _to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TokenWindows:
    """Random windows of block_size+1 tokens from a flat token stream: x = w[:-1], y = w[1:].

    Window j of the stream starts at a position drawn from (seed, j) alone: PCG64 can jump to
    its j-th output directly. All ranks share one stream, rank r taking windows pos + r*B ..
    pos + r*B + B - 1 of each micro-step; the state is the global position, so a checkpoint
    resumes on any number of processes and every optimizer step still reads the same windows."""

    def __init__(self, data_dir, split, block_size, batch_size, vocab_size, seed=1337, rank=0, world_size=1):
        self.path = os.path.join(data_dir, f"{split}.bin")
        n = check_tokens(data_dir, split, vocab_size)
        if n < block_size + 1:
            raise DataError(f"{self.path} holds {n} tokens, fewer than one block "
                            f"(block_size+1 = {block_size + 1}); lower block_size or add data")
        self.n, self.block_size, self.batch_size = n, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pos = 0  # windows drawn so far by all ranks together

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Start offsets of windows first .. first+count-1 of this seed's stream."""
        bits = np.random.PCG64(self.seed)
        bits.advance(first)  # as if `first` 64-bit numbers had been drawn
        # modulo bias is below (n / 2^64): nothing at any dataset size
        return (bits.random_raw(count) % np.uint64(self.n - self.block_size)).astype(np.int64)

    def get_batch(self, device="cpu"):
        # Re-open the memmap for every batch: a long-lived memmap keeps every page it ever
        # touched resident, so RSS would grow with the dataset.
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        starts = self.window_starts(self.pos + self.rank * self.batch_size, self.batch_size)
        self.pos += self.batch_size * self.world_size
        w = torch.from_numpy(np.stack([data[s:s + self.block_size + 1] for s in starts]).astype(np.int64))
        return _to_device(w[:, :-1], device), _to_device(w[:, 1:], device), None

    def rewind(self) -> None:
        """Back to the first window (evaluation reads the same windows every time)."""
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


class Examples:
    """Whole examples from an example dataset, right-padded to the longest in the batch.

    For an example e (tokens t_0..t_n): x = t_0..t_{n-1}, y = t_1..t_n, so the target at
    position i is the token that follows it. With a mask file, y[i] counts as a target when
    mask[i+1] = 1; the rest gets weight prompt_loss_weight (0: ignored). Padding is always
    ignored (y = -1). An example longer than block_size+1 keeps its last block_size+1 tokens:
    the answer sits at the end (the class token), so the start is cut. With whole_only (chat
    data, which prepare/sft.py cuts at turn boundaries) a longer example is an error instead:
    cutting it here would start it mid-turn.
    The state (epoch, position) is global: rank r takes its slice of each global batch.
    """

    def __init__(self, data_dir, split, block_size, batch_size, vocab_size, seed=1337,
                 rank=0, world_size=1, shuffle=True, prompt_loss_weight=0.0, whole_only=False,
                 accum=1, group_by_length=False):
        base = os.path.join(data_dir, split)
        self.bin_path, self.mask_path = base + ".bin", base + ".mask.bin"
        n_tokens = check_tokens(data_dir, split, vocab_size)
        if not os.path.exists(base + ".idx"):
            raise DataError(f"{base}.idx is missing: {data_dir} is not an example dataset")
        if os.path.getsize(base + ".idx") % 8:
            raise DataError(f"{base}.idx has {os.path.getsize(base + '.idx')} bytes, not a whole number "
                            "of 8-byte offsets: it was cut short. Re-run the prepare script")
        self.starts = np.fromfile(base + ".idx", dtype=np.uint64).astype(np.int64)
        self.ends = np.append(self.starts[1:], n_tokens)
        if len(self.starts) == 0 or self.starts[0] != 0 or np.any(self.ends <= self.starts):
            raise DataError(f"{base}.idx is empty or not increasing; re-run the prepare script")
        longest = int((self.ends - self.starts).max())
        if whole_only and longest > block_size + 1:
            raise DataError(f"{base}.bin holds an example of {longest} tokens, longer than "
                            f"block_size + 1 = {block_size + 1}; cutting it would start it mid-turn. "
                            f"Prepare it again with --max_length {block_size + 1}, or raise block_size")
        self.has_mask = os.path.exists(self.mask_path)
        if self.has_mask and os.path.getsize(self.mask_path) != n_tokens:
            raise DataError(f"{self.mask_path} has {os.path.getsize(self.mask_path)} bytes but "
                            f"{self.bin_path} has {n_tokens} tokens; re-run the prepare script")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.accum = accum  # micro-batches per optimizer step on each rank
        self.group_by_length = group_by_length
        self.prompt_loss_weight = prompt_loss_weight
        self.epoch, self.pos = 0, 0
        self.order = self._order()

    def __len__(self) -> int:
        return len(self.starts)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self))
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
        order = rng.permutation(len(self))
        if not self.group_by_length:
            return order
        # Each optimizer step sorted by length before it is cut into micro-batches (and ranks):
        # a micro-batch pads to its longest example, so on chats of 17..59 tokens random
        # micro-batches are ~40% padding. Which examples a step holds never changes (sorting
        # across steps trained worse: steps of one length are steps of one kind of question).
        step = self.batch_size * self.world_size * self.accum
        full = len(order) // step * step
        steps = order[:full].reshape(-1, step)
        steps = np.take_along_axis(steps, np.argsort(self.lengths()[steps], axis=1, kind="stable"), axis=1)
        return np.concatenate([steps.ravel(), order[full:]])

    def lengths(self) -> np.ndarray:
        """The token count of each item the order holds (what group_by_length sorts by); a
        subclass whose items are groups of examples (dpo.py's pairs) gives a group's."""
        return self.ends - self.starts

    def collate(self, indices, device="cpu"):
        """(x, y, w) for the examples at indices; w is None unless 0 < prompt_loss_weight < 1."""
        data = np.memmap(self.bin_path, dtype=np.uint16, mode="r")
        masks = np.memmap(self.mask_path, dtype=np.uint8, mode="r") if self.has_mask else None
        T = self.block_size
        seqs = [(max(int(self.starts[i]), int(self.ends[i]) - (T + 1)), int(self.ends[i]))
                for i in indices]
        L = max(e - s for s, e in seqs) - 1
        x = np.zeros((len(seqs), L), dtype=np.int64)
        y = np.full((len(seqs), L), -1, dtype=np.int64)
        w = np.zeros((len(seqs), L), dtype=np.float32)
        for b, (s, e) in enumerate(seqs):
            tok = data[s:e].astype(np.int64)
            n = len(tok) - 1
            x[b, :n], y[b, :n] = tok[:-1], tok[1:]
            w[b, :n] = masks[s + 1:e] if masks is not None else 1.0
        if masks is not None:
            w = np.where(w > 0, 1.0, self.prompt_loss_weight).astype(np.float32)
            w[y == -1] = 0.0
            y[w == 0] = -1
        weights = None
        if masks is not None and 0 < self.prompt_loss_weight < 1:
            weights = _to_device(torch.from_numpy(w), device)
        return _to_device(torch.from_numpy(x), device), _to_device(torch.from_numpy(y), device), weights

    def get_batch(self, device="cpu"):
        """The next batch of this rank. An epoch ends (with a fresh shuffle) only between
        optimizer steps, when a whole step no longer fits: so batch 8 x 1, 4 x 2 and 2
        processes x 4 read the same examples in every step."""
        micro = self.batch_size * self.world_size
        step = micro * self.accum
        if (self.pos // micro) % self.accum == 0 and self.pos + step > len(self):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self._order()
            if step > len(self):
                raise DataError(f"{self.bin_path} holds {len(self)} examples, fewer than one "
                                f"optimizer step takes ({step}); lower batch_size or "
                                "gradient_accumulation_steps")
        lo = self.pos + self.rank * self.batch_size
        batch = self.order[lo:lo + self.batch_size]
        self.pos += micro
        return self.collate(batch, device)

    def iter_batches(self, device="cpu", max_batches=None):
        """Every example once, in file order (this rank's share), for evaluation."""
        mine = np.arange(len(self))[self.rank::self.world_size]
        for k, lo in enumerate(range(0, len(mine), self.batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            yield mine[lo:lo + self.batch_size], self.collate(mine[lo:lo + self.batch_size], device)

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.pos / len(self)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = self._order()


def is_example_dataset(data_dir: str) -> bool:
    return os.path.exists(os.path.join(data_dir, "train.idx"))


# ----------------------------------------------------------------------------- users' input files

def open_input(path: str):
    """path opened for reading bytes; a missing or unreadable file is a DataError naming it."""
    try:
        return open(path, "rb")
    except OSError as e:  # FileNotFoundError, IsADirectoryError, PermissionError
        raise DataError(f"{path}: {e.strerror.lower()}; check the path") from None


def decode_utf8(raw: bytes, path: str, first_line: int = 1) -> str:
    """raw as text; bytes that are not UTF-8 are a DataError naming the file and the line
    (first_line is the line raw starts on)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); is it a "
                        "binary file? Save it as UTF-8") from None


def read_utf8(path: str) -> str:
    """The whole text of a user's file, a leading byte-order mark removed."""
    with open_input(path) as f:
        return decode_utf8(f.read(), path).removeprefix("\ufeff")
