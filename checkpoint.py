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
    weight/<run>/ckpt.dcp/ the same, sharded (sharded_checkpoint = True under parallel = fsdp):
    weight/<run>/best.dcp/ a torch.distributed.checkpoint folder in which every process wrote its
                           own shards, plus danlu.pt (everything but the tensors, weights_only).
                           load_checkpoint reads one in a single process (the whole weights, as
                           from a .pt), so every reader takes both forms; a resume loads each
                           process's optimizer shards (train.py).
sample.py, export.py, serve.py and sft.py's `base` read a run folder's best checkpoint when it
exists, else its ckpt (weights_path); a path to a .pt file (or a .dcp folder) reads that. None is
ever written holding non-finite weights (train.py checks before saving).

A LoRA run's files hold only its adapters, with `lora_base`: {"path", "sha256"} naming the base
they were trained on and the hash of its weights. load_model and plain_checkpoint read the base
again from that path and refuse it when its weights changed since.
"""
import dataclasses
import hashlib
import os
import pickle
import shutil
import warnings

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
    """torch.save through atomic_write; a full disk says what survived. A run's name.pt replaces
    its sharded name.dcp/ (an older state of the same run, when sharded_checkpoint was switched)."""
    try:
        with atomic_write(path) as f:
            torch.save({"format_version": CKPT_VERSION, **ckpt}, f)
    except OSError as e:  # disk full, quota, permissions
        raise CheckpointError(f"could not write {path} ({e}); the previous file there is "
                              "untouched. Free disk space (or fix the folder) and resume.") from e
    if os.path.basename(path) in ("ckpt.pt", "best.pt"):
        remove_sharded(path[:-len(".pt")] + SHARDED)


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


def checkpoint_path(folder: str, name: str = "ckpt") -> str | None:
    """A run folder's checkpoint `name` (ckpt or best): name.pt or the sharded name.dcp/,
    whichever was written last (both are there only if a save was killed between writing one
    and removing the other); None when there is neither."""
    single = os.path.join(folder, name + ".pt")
    found = [p for p in (single if os.path.isfile(single) else None,
                         sharded_folder(os.path.join(folder, name + SHARDED))) if p]
    return max(found, key=written_at) if found else None


def written_at(path: str) -> float:
    return os.path.getmtime(os.path.join(path, RUN_STATE) if os.path.isdir(path) else path)


def is_run_folder(path: str) -> bool:
    """A run folder (weight/<run>), not a sharded checkpoint (a .dcp folder)."""
    return os.path.isdir(path) and not path.rstrip("/").endswith(SHARDED)


def weights_path(path: str) -> str:
    """What to read weights from: a run folder's best checkpoint if it has one, else its ckpt
    (.pt or sharded .dcp/); a file path (or a .dcp folder) is itself."""
    if is_run_folder(path):
        return checkpoint_path(path, "best") or checkpoint_path(path, "ckpt") or os.path.join(path, "ckpt.pt")
    return path


def load_checkpoint(path: str) -> dict:
    """A checkpoint on the CPU (torch.load with weights_only=True; a sharded one consolidated in
    this process), every failure turned into a message a user can act on. Always the CPU: the
    caller moves weights to its device, and the RNG and optimizer tensors must not land on a GPU
    (set_rng_state takes CPU tensors only)."""
    if is_run_folder(path):
        path = checkpoint_path(path, "ckpt") or os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py config/...)")
    if os.path.isdir(path):
        ckpt = read_torch(os.path.join(path, RUN_STATE))
        if isinstance(ckpt, dict):
            ckpt.update(model=read_shards(path, "model"), shards=path)
    else:
        ckpt = read_torch(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} loads, but is not a danlu checkpoint (no model/model_config)")
    version = ckpt.get("format_version", 0)
    if version > CKPT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}, newer than this danlu "
                              f"reads ({CKPT_VERSION}); update danlu")
    return upgrade(ckpt)


def read_torch(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable danlu checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "It may be truncated (disk full, killed copy) or from another program; restore "
            "it from a backup or retrain.") from None


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
    return (os.path.isfile(path) or sharded_folder(path) is not None
            or any(checkpoint_path(path, n) for n in ("ckpt", "best")))


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


# ----------------------------------------------------------------------------- sharded checkpoints

SHARDED = ".dcp"  # weight/<run>/ckpt.dcp/, best.dcp/: torch.distributed.checkpoint folders
RUN_STATE = "danlu.pt"  # in each: all but the shards (configs, tokenizer, iteration, data position)


def sibling(path: str, what: str) -> str:
    """.ckpt.dcp.tmp (a save being written) or .ckpt.dcp.old (the previous one, during the swap)."""
    folder, name = os.path.split(path.rstrip("/"))
    return os.path.join(folder, f".{name}.{what}")


def sharded_folder(path: str) -> str | None:
    """The complete checkpoint at path (a .dcp folder): path itself, or, when a save was killed
    between its two renames, the previous one it had moved aside; None if neither is there. A
    folder is complete once it holds RUN_STATE: rank 0 writes that last."""
    if not path.rstrip("/").endswith(SHARDED):
        return None
    for candidate in (path, sibling(path, "old")):
        if os.path.isfile(os.path.join(candidate, RUN_STATE)):
            return candidate
    return None


def remove_sharded(path: str) -> None:
    for folder in (path, sibling(path, "old"), sibling(path, "tmp")):
        shutil.rmtree(folder, ignore_errors=True)


def save_sharded(path: str, shards: dict, run_state: dict | None, master: bool) -> None:
    """Write the folder path (name.dcp) as a whole, on every process at once: each writes its
    own shards of `shards` (nested dicts of tensors or DTensors) into the temporary sibling
    .name.dcp.tmp; rank 0 checks every process's file is there, writes run_state (RUN_STATE)
    last, then moves the previous folder aside (.name.dcp.old), renames the new one in and
    removes the old one. Killed at any moment, the previous checkpoint stays whole and loadable
    (sharded_folder finds it under either name). Every process must see the same out_dir (a
    shared file system across nodes)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    check_tensors(shards, path)
    distributed = dist.is_available() and dist.is_initialized()
    tmp, old = sibling(path, "tmp"), sibling(path, "old")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        os.makedirs(tmp)
    if distributed:
        dist.barrier()  # the fresh folder exists before any process writes into it
    try:
        with warnings.catch_warnings():  # DCP warns when it writes in one process (tests do)
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(shards, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not distributed)
    except Exception as e:  # DCP raises the failure of any process on every process
        raise CheckpointError(f"could not write {path} ({str(e)[:300]}); the previous checkpoint there is "
                              "untouched. Free disk space (or fix the folder) and resume.") from None
    if master:
        missing = sorted({i.relative_path for i in read_shard_metadata(tmp).storage_data.values()}
                         - set(os.listdir(tmp)))
        if missing:
            raise CheckpointError(f"{tmp} lacks {', '.join(missing[:3])}, written by processes on other "
                                  "machines: sharded_checkpoint needs out_dir on a file system every node "
                                  "shares; put it on one, or set sharded_checkpoint = False (rank 0 writes "
                                  "one ckpt.pt)")
        save_checkpoint(os.path.join(tmp, RUN_STATE), run_state)
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)  # a leftover: path is the newer, complete one
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_folder(os.path.dirname(path) or ".")
        shutil.rmtree(old, ignore_errors=True)
        single = path[:-len(SHARDED)] + ".pt"
        if os.path.isfile(single):  # the same run's older state, from before sharded_checkpoint
            os.remove(single)
    if distributed:
        dist.barrier()  # nobody goes on (or saves again) before the checkpoint is in place


def check_tensors(tree: dict, path: str, at: str = "") -> None:
    """Only tensors go into the shards (read_shard_metadata refuses anything else)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            check_tensors(value, path, f"{at}{key}.")
        elif not torch.is_tensor(value):
            raise CheckpointError(f"{path}: {at}{key} is a {type(value).__name__}, not a tensor; a sharded "
                                  "checkpoint holds tensors only (set sharded_checkpoint = False)")


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What a DCP .metadata file may hold. DCP pickles it (torch 2.13 has no other format, and its
# FileSystemReader unpickles it with pickle.load, which runs whatever a crafted file asks for);
# this unpickler builds only these classes, so reading a stranger's folder runs no code of theirs.
METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorProperties", "TensorStorageMetadata", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and name not in METADATA_CLASSES.get(module, ()):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def read_shard_metadata(path: str):
    """A .dcp folder's metadata, read by MetadataUnpickler and refused if it names anything but
    tensors: DCP reads a non-tensor entry with torch.load(weights_only=False), and danlu writes
    none (its tensors are read with weights_only=True)."""
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        entries = metadata.state_dict_metadata.items()
    except Exception as e:
        raise CheckpointError(f"{file} is not the metadata of a danlu sharded checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); restore the run folder from a backup or retrain") from None
    odd = [k for k, v in entries if not isinstance(v, TensorStorageMetadata)]
    if odd:
        raise CheckpointError(f"{file} holds entries that are not tensors ({', '.join(odd[:3])}); danlu writes "
                              "only tensors in a sharded checkpoint, so it does not read this folder")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def shard_reader(path: str):
    """DCP's FileSystemReader, its metadata read by read_shard_metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_shard_metadata(self.checkpoint_id)
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return Reader(path)


def read_shards(path: str, prefix: str) -> dict:
    """The tensors saved under `prefix` (e.g. "model"), each whole, read in this process alone
    from the shards every process wrote (the one consolidation: a sharded run's weights for
    sample, serve, eval, export, sft's base and a resume's model)."""
    import torch.distributed.checkpoint as dcp
    reader = shard_reader(path)
    metadata = reader.read_metadata()
    start = prefix + "."
    state = {k[len(start):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items() if k.startswith(start)}
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the point
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load({prefix: state}, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{path}: its shards could not be read ({type(e).__name__}: {str(e)[:200]}); a "
                              "shard file may be missing or truncated; restore the folder or retrain") from None
    return state


def load_shards_into(path: str, state: dict) -> None:
    """Fill state (nested dicts of tensors or DTensors, as this process holds them) from the
    checkpoint at path, resharded to this process's layout: collective, every process calls it."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.load(state, storage_reader=shard_reader(path))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: its shards could not be read into this run ({str(e)[:300]}); the "
                              "model or optimizer differs from the saved one, or a shard file is missing") from None
