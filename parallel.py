"""
How the training objective is spread over processes, applied to a built model (as torchtitan's
parallelize step does; model.py never learns about it):

    ddp   every process holds the whole model and optimizer; gradients are averaged (DDP)
    fsdp  FSDP2 (torch.distributed.fsdp.fully_shard): each block, and the rest of the model,
          is sharded across the processes, parameters gathered for each block's forward and
          backward; with bf16, computed in bf16 and reduced in float32, the float32 weights and
          optimizer state sharded (a process holds ~1/N of them)

activation_checkpointing recomputes each block's activations in the backward pass instead of
keeping them (less memory, about a third more compute). Checkpoints: under FSDP the whole state
is gathered to rank 0 and written as ckpt.pt, or with sharded_checkpoint each process writes its
shards (checkpoint.save_sharded); either resumes on any number of processes and is sampled,
served, evaluated and exported like any other.
"""
import contextlib
import functools
import os
import shutil
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from checkpoint import load_shards_into
from model import GPT
from settings import ConfigError


def parallelize(objective: nn.Module, model: GPT, cfg, run) -> nn.Module:
    """The objective as a step calls it: with each block checkpointed if asked, compiled if
    asked, and wrapped for the processes (DDP or FSDP2) under torchrun."""
    if cfg.activation_checkpointing:
        for block in model.transformer.h:
            # an instance attribute: the module and its parameter names stay as they are
            block.forward = functools.partial(checkpoint, type(block).forward, block, use_reentrant=False)
    if cfg.compile and run.device_type == "cpu":
        check_cpu_compiler()
    if cfg.parallel == "fsdp":
        return shard(objective, model, cfg, run)
    if cfg.compile:
        objective = torch.compile(objective)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        objective = DDP(objective, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
    return objective


def check_cpu_compiler() -> None:
    """On a CPU torch.compile writes its kernels in C++ and builds them with the compiler that
    inductor looks for ($CXX, else g++; clang++ on macOS; cl on Windows); without one the first
    step fails deep inside inductor. Say so before the run starts."""
    default, install = {"win32": ("cl", "Visual Studio's C++ build tools"),
                        "darwin": ("clang++", "xcode-select --install")}.get(sys.platform,
                                                                             ("g++", "apt-get install g++"))
    cxx = os.environ.get("CXX", default)
    if shutil.which(cxx) is None:
        raise ConfigError(f"compile = True on a CPU builds C++ kernels with {cxx}, which is not on PATH: "
                          f"install it ({install}) or set --compile=False", "compile")


def shard(objective: nn.Module, model: GPT, cfg, run) -> nn.Module:
    """FSDP2 on every block, then on the objective (the root: embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not run.ddp:
        raise ConfigError("parallel = 'fsdp' shards across processes: run under torchrun "
                          "(torchrun --nproc_per_node=N train.py ...), or use parallel = 'ddp'", "parallel")
    if cfg.optimizer == "muon":
        raise ConfigError("optimizer = 'muon' orthogonalises whole matrices, which FSDP shards; "
                          "use optimizer = 'adamw' with parallel = 'fsdp'", "optimizer")
    if run.dtype == "float16":
        raise ConfigError("dtype = 'float16' needs a gradient scaler FSDP2 does not take here; use "
                          "bfloat16 (or float32) with parallel = 'fsdp'", "dtype")
    bf16 = run.dtype == "bfloat16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return torch.compile(objective) if cfg.compile else objective


def is_sharded(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def no_sync(wrapped: nn.Module, last: bool):
    """Gradients are reduced across processes on the last micro-step only."""
    if last:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return gradient_sync_off(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gradient_sync_off(wrapped):
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor, on every process."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def gathered(wrapped: nn.Module):
    """Inside: the root's parameters whole on every process, so the model can be called
    directly (evaluation hooks, sampling); the blocks gather their own as they run."""
    if not hasattr(wrapped, "unshard"):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def model_state(model: nn.Module, sharded: bool) -> dict:
    """The whole state dict on the CPU (on every process: the gather is collective)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer, sharded: bool) -> dict:
    """An optimizer's state to save: as torch keeps it, or under FSDP gathered whole and keyed
    by parameter name, so it loads on any number of processes."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, saved: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def sharded_state(model: nn.Module, optimizers: list, weights_only: bool) -> dict:
    """What each process writes of a sharded checkpoint: its shards, nothing gathered. The
    optimizer's per-parameter state only, keyed by parameter name (its hyperparameters come from
    the config on resume, as for ckpt.pt), so every entry is a tensor."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"model": get_model_state_dict(model)}
    if not weights_only:
        for i, opt in enumerate(optimizers):
            state[f"optimizer_{i}"] = {"state": get_optimizer_state_dict(model, opt)["state"]}
    return state


def load_sharded_optimizers(path: str, model: nn.Module, optimizers: list) -> None:
    """Each optimizer's state from a sharded checkpoint, resharded to this run's processes: DCP
    reads into the (fresh) state as this process holds it, which then goes into the optimizer."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    held = [get_optimizer_state_dict(model, opt) for opt in optimizers]
    load_shards_into(path, {f"optimizer_{i}": {"state": h["state"]} for i, h in enumerate(held)})
    for opt, h in zip(optimizers, held):
        set_optimizer_state_dict(model, opt, h)


def shard_bytes(model: nn.Module, optimizers: list) -> dict:
    """Bytes this process holds for parameters, gradients and optimizer state (its shards)."""
    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(local(p).numel() * local(p).element_size() for p in model.parameters() if p.requires_grad)
    state = sum(local(v).numel() * local(v).element_size() for opt in optimizers
                for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optimizer": state}


def all_ranks_finite(tensors, run) -> bool:
    """Whether every tensor is finite on every process (each checks its shards)."""
    ok = torch.tensor(float(all(bool(local(t).isfinite().all()) for t in tensors)), device=run.device)
    if run.ddp and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
