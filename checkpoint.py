"""
Checkpoints, and every source of weights: ckpt.pt / best.pt save and load (one format, one
upgrade()), and "a source -> a checkpoint" for a run folder, a .pt file, a Hugging Face folder
(read by convert.py) or a GPT-2 name, with LoRA runs rebuilt on their base (lora.py).

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
import dataclasses
import hashlib
import os

import torch

from convert import (GPT2_NAMES, ConvertError, download_gpt2, folder_file, folder_tokenizer, hf_checkpoint,
                     is_hf_folder, read_json)
from files import atomic_write
from lora import LORA_KEYS, add_adapters, lora_config, merge
from model import GPT, gpt_config

CKPT_VERSION = 3


class CheckpointError(RuntimeError):
    pass


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
    numbers as a function of (seed, rank, iteration) and keeps one global data position.
    Version 2 kept the LoRA keys in model_config and the new tokens' rows as lora_wte /
    lora_head; version 3 keeps the keys under "lora" and the rows in the modules that use them."""
    version = ckpt.get("format_version", 0)
    if version < 2 and "rng" in ckpt:
        rng = ckpt.pop("rng")
        ckpt["loader"] = None  # v1 stored a generator state this loader no longer uses
        ckpt["world_size"] = len(rng)
    if version < 3:
        keys = {k: ckpt["model_config"].pop(k) for k in LORA_KEYS if k in ckpt["model_config"]}
        if keys.get("lora_rank"):
            ckpt["lora"] = keys
        state = ckpt["model"]
        if "lora_wte" in state:
            state["transformer.wte.lora_rows"] = state.pop("lora_wte")
            tied = ckpt["model_config"].get("tie_embeddings", True)
            state["lm_head.lora_rows"] = state["transformer.wte.lora_rows"] if tied else state.pop("lora_head")
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


def load_model(source: str, device: str = "cpu"):
    """(model in eval mode, checkpoint dict) from a run folder (best.pt, else ckpt.pt), a
    checkpoint file, a Hugging Face folder or a GPT-2 name (pretrained_checkpoint). A LoRA
    run comes with its base, adapters beside it (unmerged, as trained)."""
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
    plain = dataclasses.replace(config, vocab_size=base["model_config"]["vocab_size"])
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
    ref = ckpt["lora_base"]
    if ref["path"] not in GPT2_NAMES and not os.path.exists(ref["path"]):
        raise CheckpointError(f"{where} holds LoRA adapters of the base {ref['path']}, which is not there; "
                              "run from the folder it was trained in, or put the base back at that path")
    base = plain_checkpoint(ref["path"])
    check_base(ref, base, where)
    config = gpt_config(ckpt["model_config"])
    new_ids = range(base["tokenizer"]["vocab_size"], ckpt["tokenizer"]["vocab_size"])
    return add_adapters(base_model(base, config, new_ids), lora_config(ckpt["lora"]), ckpt["model"])


def plain_checkpoint(source: str) -> dict:
    """pretrained_checkpoint(source), with a LoRA run's adapters merged into its base: the
    checkpoint of a plain model (export.py, sft.py's base, train.py's init_from)."""
    ckpt = pretrained_checkpoint(source)
    if not ckpt.get("lora_base"):
        return ckpt
    model = merge(lora_model(ckpt, source))
    ckpt.update(model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                merged_from=ckpt.pop("lora_base"))
    ckpt.pop("lora", None)
    return ckpt


# ----------------------------------------------------------------------------- sources

def is_run(path: str) -> bool:
    return os.path.isfile(path) or any(os.path.exists(os.path.join(path, n)) for n in ("ckpt.pt", "best.pt"))


def pretrained_checkpoint(source: str) -> dict:
    """A checkpoint-shaped dict (model, model_config, tokenizer, train_config, iter_num) from a
    gpt2 name, a Hugging Face folder or a danlu run folder / .pt file."""
    if source in GPT2_NAMES:
        return hf_checkpoint(download_gpt2(source), source)
    if is_run(source):
        return load_checkpoint(weights_path(source))
    if is_hf_folder(source):
        return hf_checkpoint(source, source)
    missing = "" if os.path.exists(source) else " does not exist"
    raise ConvertError(f"{source}{missing}: not a GPT-2 name ({', '.join(GPT2_NAMES)}), a Hugging Face folder "
                       "(config.json + model.safetensors) or a danlu run folder (ckpt.pt)")


def tokenizer_meta(source: str) -> dict:
    """The tokenizer meta of a source, without reading its weights (prepare/text.py
    --tokenizer=HF_FOLDER: data for continued pretraining of an imported model)."""
    if source in GPT2_NAMES:
        source = download_gpt2(source)
    if is_run(source):
        return load_checkpoint(weights_path(source))["tokenizer"]
    if not os.path.isdir(source):
        raise ConvertError(f"{source}: not a GPT-2 name, a Hugging Face folder or a danlu run folder")
    hf = {}
    if os.path.exists(os.path.join(source, "config.json")):  # checked like every file of a stranger's folder
        hf = read_json(folder_file(source, "config.json"))
    return folder_tokenizer(source, hf)


def load_pretrained(source: str):
    """(GPTConfig, state dict, tokenizer meta) of a gpt2 name, HF folder or danlu run."""
    ckpt = pretrained_checkpoint(source)
    return gpt_config(ckpt["model_config"]), ckpt["model"], ckpt["tokenizer"]


def grow_vocab(model: GPT, vocab_size: int, new_ids: range) -> GPT:
    """The same model with vocab_size rows in wte and lm_head (tied or not). Rows of new_ids
    (which may include the old padding rows) start at the mean of the trained rows below
    new_ids.start, so a new token begins as an 'average' token rather than a random one;
    every other row is kept, so logits of old tokens do not change."""
    old = model.config.vocab_size
    if vocab_size <= old and len(new_ids) == 0:
        return model
    grown = GPT(dataclasses.replace(model.config, vocab_size=max(old, vocab_size)))
    state = model.state_dict()
    for key in ("transformer.wte.weight", "lm_head.weight"):
        w = state[key]  # (old, C); with tied embeddings both keys hold the same matrix
        mean = w[:new_ids.start].mean(dim=0)
        rows = torch.cat([w, mean.expand(grown.config.vocab_size - old, -1)])
        rows[new_ids.start:new_ids.stop] = mean
        state[key] = rows
    grown.load_state_dict(state)
    return grown
