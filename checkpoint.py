"""
The run folder's files on disk: one atomic write, checkpoint save / load, and the policy of
which checkpoint serves which purpose.

    weight/<run>/ckpt.pt   the latest training state: weights, optimizer, GradScaler, data
                           position, iteration. Written at each evaluation when
                           always_save_checkpoint is True, and always at the end and on Ctrl-C /
                           SIGTERM. --init_from=resume continues from it.
    weight/<run>/best.pt   the weights of the evaluation with the lowest val loss so far (no
                           optimizer state). Written whenever val loss improves.
sample.py, export.py, serve.py and sft.py's `base` read a run folder's best.pt when it exists,
else its ckpt.pt (weights_path); a path to a .pt file reads that file. Neither file is ever
written holding non-finite weights (train.py checks before saving).

A LoRA run's files hold only its adapters, with `lora_base`: {"path", "sha256"} naming the base
they were trained on and the hash of its weights. load_model and plain_checkpoint read the base
again from that path and refuse it when its weights changed since.
"""
import contextlib
import dataclasses
import glob
import hashlib
import os

import torch

CKPT_VERSION = 2


class CheckpointError(RuntimeError):
    pass


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """Open a temp file beside path for writing; on success fsync it, rename it over path and
    fsync the folder, so a crash at any moment leaves the old file or the new one, never half.
    On failure the temp file is removed and the old file is untouched. Temp files left by a
    killed writer (kill -9, power loss) are removed the next time path is written."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.*.tmp")):
        pid = stale.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            os.remove(stale)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint(path: str, ckpt: dict) -> None:
    """torch.save through atomic_write; a full disk says what survived."""
    try:
        with atomic_write(path) as f:
            torch.save({"format_version": CKPT_VERSION, **ckpt}, f)
    except OSError as e:  # disk full, quota, permissions
        raise CheckpointError(f"could not write {path} ({e}); the previous file there is "
                              "untouched. Free disk space (or fix the folder) and resume.") from e


def upgrade(ckpt: dict) -> dict:
    """Bring an older checkpoint to CKPT_VERSION (the one place that knows old layouts).
    Version 1 kept every rank's RNG and data-loader state under "rng"; version 2 draws random
    numbers as a function of (seed, rank, iteration) and keeps one global data position."""
    if ckpt.get("format_version", 0) < 2 and "rng" in ckpt:
        rng = ckpt.pop("rng")
        ckpt["loader"] = None  # v1 stored a generator state this loader no longer uses
        ckpt["world_size"] = len(rng)
    ckpt["format_version"] = CKPT_VERSION
    return ckpt


def weights_path(path: str) -> str:
    """The file to read weights from: a run folder's best.pt if it has one, else its ckpt.pt;
    a file path is itself."""
    if os.path.isdir(path):
        best = os.path.join(path, "best.pt")
        return best if os.path.exists(best) else os.path.join(path, "ckpt.pt")
    return path


def load_checkpoint(path: str) -> dict:
    """A checkpoint on the CPU (torch.load with weights_only=True), every failure turned into a
    message a user can act on. Always the CPU: the caller moves weights to its device, and the
    RNG and optimizer tensors must not land on a GPU (set_rng_state takes CPU tensors only)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py config/...)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable danlu checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "It may be truncated (disk full, killed copy) or from another program; restore "
            "it from a backup or retrain.") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} loads, but is not a danlu checkpoint (no model/model_config)")
    version = ckpt.get("format_version", 0)
    if version > CKPT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}, newer than this danlu "
                              f"reads ({CKPT_VERSION}); update danlu")
    return upgrade(ckpt)


def gpt_config(source, **changes):
    """The one way to build a GPTConfig: from a checkpoint's model_config dict or any config
    object holding the GPTConfig keys (train's, sft's), other keys ignored, then `changes`."""
    from model import GPTConfig
    get = source.get if isinstance(source, dict) else lambda k, d=None: getattr(source, k, d)
    known = {f.name: get(f.name, f.default) for f in dataclasses.fields(GPTConfig)}
    known = {k: v for k, v in known.items() if v is not dataclasses.MISSING}
    return GPTConfig(**{**known, **changes})


def load_model(source: str, device: str = "cpu"):
    """(model in eval mode, checkpoint dict) from a run folder (best.pt, else ckpt.pt), a
    checkpoint file, a Hugging Face folder or a GPT-2 name (convert.py reads those two). A LoRA
    run comes with its base, adapters beside it (unmerged, as trained)."""
    from convert import pretrained_checkpoint
    from model import GPT
    ckpt = pretrained_checkpoint(source)
    if ckpt.get("lora_base"):
        model = lora_model(ckpt, source)
    else:
        model = GPT(gpt_config(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- LoRA runs

def weights_hash(state: dict) -> str:
    """sha256 of a state dict (names, dtypes, shapes, bytes): the identity of a LoRA base,
    whatever file or folder format it came from."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key} {t.dtype} {tuple(state[key].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def base_model(base: dict, config, new_ids: range):
    """The plain model a fine-tune starts from: base's weights (a checkpoint dict), learned
    positions cut to config.block_size, the vocabulary grown to config.vocab_size (new_ids at
    the mean row), dropout and attn_impl from config. train.py and sft.py build the base this
    way, and a LoRA run's base is rebuilt this way when it loads."""
    from model import GPT, grow_vocab
    plain = dataclasses.replace(config, vocab_size=base["model_config"]["vocab_size"], lora_rank=0,
                                lora_new_tokens_from=0)
    state = dict(base["model"])
    if "transformer.wpe.weight" in state:  # learned positions: keep the first block_size
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:config.block_size]
    model = GPT(plain)
    model.load_state_dict(state)
    return grow_vocab(model, config.vocab_size, new_ids)


def base_reference(path: str, base: dict) -> dict:
    """What a LoRA checkpoint records of its base: the path it was read from and its hash."""
    return {"path": path, "sha256": weights_hash(base["model"])}


def check_base(ref: dict, base: dict, where: str) -> None:
    now = weights_hash(base["model"])
    if now != ref["sha256"]:
        raise CheckpointError(f"{where}: its LoRA base {ref['path']} changed since the adapters were trained "
                              f"(sha256 {ref['sha256'][:12]} then, {now[:12]} now); put that base back, or "
                              "train new adapters on this one in another out_dir")


def lora_model(ckpt: dict, where: str):
    """A LoRA run's model: its base read again from lora_base's path (refused when its weights
    changed) with the checkpoint's adapters beside it."""
    from convert import GPT2_NAMES
    from model import add_adapters
    ref = ckpt["lora_base"]
    if ref["path"] not in GPT2_NAMES and not os.path.exists(ref["path"]):
        raise CheckpointError(f"{where} holds LoRA adapters of the base {ref['path']}, which is not there; "
                              "run from the folder it was trained in, or put the base back at that path")
    base = plain_checkpoint(ref["path"])
    check_base(ref, base, where)
    config = gpt_config(ckpt["model_config"])
    new_ids = range(base["tokenizer"]["vocab_size"], ckpt["tokenizer"]["vocab_size"])
    return add_adapters(base_model(base, config, new_ids), config, ckpt["model"])


def plain_checkpoint(source: str) -> dict:
    """convert.pretrained_checkpoint(source), with a LoRA run's adapters merged into its base:
    the checkpoint of a plain model (export.py, sft.py's base, train.py's init_from)."""
    from convert import pretrained_checkpoint
    ckpt = pretrained_checkpoint(source)
    if not ckpt.get("lora_base"):
        return ckpt
    model = lora_model(ckpt, source).merged()
    ckpt.update(model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                merged_from=ckpt.pop("lora_base"))
    return ckpt
