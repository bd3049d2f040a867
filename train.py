"""
Pretraining, and the one training loop that sft.py reuses.

    python train.py config/shakespeare_char_cpu.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py

Flat token datasets are read as random block_size windows; example datasets (data/<name>/*.idx,
e.g. tiny_cls) as whole examples with their loss masks. The run folder weight/<run>/ gets
ckpt.pt, config.json, log.jsonl and loss.png. Ctrl-C / SIGTERM finishes the step, saves and exits.

Longer than the house's ~500 lines on purpose: the objective, evaluation, checkpoints, the loop
and the entry point read top to bottom in one file, so a training step never leaves it but for
the model (model.py) and the batches (data.py); split, a reader would cross files for each.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from checkpoint import (SHARDED, CheckpointError, base_model, base_reference, checkpoint_path, load_checkpoint,
                        lora_model, plain_checkpoint, remove_sharded, save_checkpoint, save_sharded)
from classify import accuracy_eval, class_token_ids
from convert import check_fits_uint16
from data import DataError, Examples, TokenWindows, dataset_dir, is_example_dataset
from files import atomic_write
from lora import LoRAConfig, add_adapters, check_lora, freeze_base, is_adapter, lora_config
from model import GPT, GPTConfig, gpt_config
from muon import make_muon
from parallel import (all_ranks_finite, full, gathered, is_sharded, load_optimizer_state, load_sharded_optimizers,
                      model_state, no_sync, optimizer_state, parallelize, shard_bytes, sharded_state)
from runtime import (Logger, Runtime, StopSignal, all_reduce_sum, peak_flops, print0, resolve_cpu_dtype,
                     setup_runtime)
from settings import ConfigError, changed_settings, cli, config_dict, load_config, setting
from tokenizer import load_meta, same_base


@dataclass
class TrainConfig(GPTConfig, LoRAConfig):
    # data and run folder
    dataset: str = "shakespeare_char"  # data/<dataset>/
    out_dir: str = ""  # default: weight/<dataset>
    # auto (resume out_dir's ckpt.pt if there is one, else scratch) | resume | scratch |
    # a new run from pretrained weights: weight/<run>, a Hugging Face folder, gpt2[-medium|-large|-xl]
    init_from: str = "auto"
    overwrite: bool = False  # start over in an out_dir that holds a run (its ckpt.pt, best.pt, log are replaced)
    vocab_size: int = setting(0, lo=0, hi=65536)  # 0: from the dataset's meta.json
    batch_size: int = setting(12, lo=1)  # per process, per micro-step
    gradient_accumulation_steps: int = setting(1, lo=1)  # global: divided among the processes
    prompt_loss_weight: float = setting(0.0, lo=0.0, hi=1.0)  # example datasets: weight of non-targets
    group_by_length: bool = True  # example datasets: sort each step by length before cutting it into micro-batches
    # optimizer and schedule
    optimizer: str = setting("adamw", choices=("adamw", "muon"))  # muon: Muon on hidden matrices
    learning_rate: float = setting(6e-4, above=0.0)
    muon_lr: float = setting(0.02, above=0.0)
    muon_momentum: float = setting(0.95, lo=0.0, below=1.0)
    weight_decay: float = setting(0.1, lo=0.0)
    beta1: float = setting(0.9, lo=0.0, below=1.0)
    beta2: float = setting(0.95, lo=0.0, below=1.0)
    grad_clip: float = setting(1.0, lo=0.0)  # 0: off
    max_iters: int = setting(5000, lo=1)
    decay_lr: bool = True
    lr_schedule: str = setting("cosine", choices=("cosine", "wsd"))  # wsd: warmup, stable, linear decay
    warmup_iters: int = setting(100, lo=0)
    lr_decay_iters: int = setting(0, lo=0)  # 0: max_iters
    cooldown_frac: float = setting(0.3, lo=0.0, hi=1.0)  # wsd: the last fraction decays linearly
    min_lr: float = setting(6e-5, lo=0.0)  # at most learning_rate
    # evaluation, logging, checkpoints
    eval_interval: int = setting(250, lo=1)
    eval_iters: int = setting(200, lo=1)  # global, like gradient_accumulation_steps
    eval_only: bool = False
    log_interval: int = setting(10, lo=1)
    always_save_checkpoint: bool = True  # ckpt.pt at every eval (else at the end); best.pt always
    target_val_loss: float = setting(0.0, lo=0.0)  # >0: stop at the first eval at or below it
    max_nonfinite: int = setting(5, lo=1)  # stop after this many non-finite losses in a row
    wandb_log: bool = False
    wandb_project: str = "danlu"
    wandb_run_name: str = ""
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = setting(0, lo=0)  # CPU threads; 0: the cores not busy with other work (printed at start)
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))  # auto: CUDA bf16; CPU measured
    compile: bool = False
    parallel: str = setting("ddp", choices=("ddp", "fsdp"))  # torchrun: fsdp shards weights, grads, optimizer
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
    # fsdp: each process writes its own shards (ckpt.dcp/, torch.distributed.checkpoint) instead of
    # gathering the whole state to rank 0 (ckpt.pt): for a state that does not fit one process
    sharded_checkpoint: bool = False
    dist_timeout: float = setting(600.0, lo=10.0)  # torchrun: seconds a collective waits for a lost process
    seed: int = 1337
    lora_quant: str = setting("none", choices=("none", "int8", "nf4"))  # QLoRA: a quantized frozen base

    def __post_init__(self):
        super().__post_init__()
        check_lora(self)
        if self.lora_quant != "none":
            raise ConfigError(f"lora_quant = {self.lora_quant!r}: QLoRA (a 4/8-bit frozen base) needs a CUDA GPU "
                              "with bitsandbytes or torchao and is not in danlu yet; remove the key to train "
                              "adapters on a full-precision base", "lora_quant")
        if self.sharded_checkpoint and self.parallel != "fsdp":
            raise ConfigError("sharded_checkpoint = True writes FSDP's shards; use it with parallel = 'fsdp' "
                              "(under DDP every process holds the whole state: ckpt.pt is the checkpoint)",
                              "sharded_checkpoint")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr = {self.min_lr} is above learning_rate = {self.learning_rate}; "
                              "the schedule decays from learning_rate to min_lr", "min_lr")
        if self.cls_head == "mlp" and self.prompt_loss_weight > 0:
            raise ConfigError(f"cls_head = 'mlp' learns from the class alone, so prompt_loss_weight = "
                              f"{self.prompt_loss_weight} would do nothing; set --prompt_loss_weight=0 "
                              "(or use cls_head = 'lm')", "prompt_loss_weight")


# ----------------------------------------------------------------------------- setup

def model_config_for(cfg, meta: dict) -> GPTConfig:
    """The model's config: the GPTConfig keys of cfg, vocab_size from meta.json unless set.
    A BPE-sized vocabulary is padded to a multiple of 64, which matmuls run faster on."""
    vocab_size, v = cfg.vocab_size, meta["vocab_size"]
    if vocab_size == 0:
        vocab_size = 64 * math.ceil(v / 64) if v >= 1024 else v
    elif vocab_size < v:
        raise ConfigError(f"vocab_size = {vocab_size} is smaller than the dataset's {v}; leave "
                          "it at 0 to take the dataset's", "vocab_size")
    if cfg.cls_head == "mlp" and meta.get("task") != "classify":
        raise ConfigError(f"cls_head = 'mlp' classifies, but dataset {cfg.dataset!r} has no classes; "
                          "prepare one with prepare/tiny_cls.py", "cls_head")
    n_class = len(meta["class_tokens"]) if cfg.cls_head == "mlp" else cfg.n_class
    return gpt_config(cfg, vocab_size=vocab_size, n_class=n_class)


def make_loaders(cfg, data_dir: str, meta: dict, run: Runtime, vocab_size: int) -> dict:
    """Train batches for this rank, plus fixed evaluation batches for each split. Every stream
    is a function of (seed, position) shared by all ranks, each rank taking its own slice, so a
    run resumes on any number of processes without reading a window twice."""
    if is_example_dataset(data_dir):
        def make(split, shuffle, weight):
            return Examples(data_dir, split, cfg.block_size, cfg.batch_size, vocab_size, cfg.seed,
                            run.rank, run.world_size, shuffle, weight, whole_only=meta.get("task") == "sft",
                            accum=max(1, cfg.gradient_accumulation_steps // run.world_size),
                            group_by_length=cfg.group_by_length)
        # Evaluation scores the targets alone (answers, class tokens) however much weight the
        # other tokens get in training, so val_loss always means the loss on answers; with
        # prompt_loss_weight 1 every token is a target, in training and in evaluation.
        eval_weight = 1.0 if cfg.prompt_loss_weight >= 1 else 0.0
        return {"train": make("train", True, cfg.prompt_loss_weight),
                "eval": {s: make(s, False, eval_weight) for s in ("train", "val")}}

    def windows(split, seed):
        return TokenWindows(data_dir, split, cfg.block_size, cfg.batch_size, vocab_size, seed,
                            run.rank, run.world_size)
    return {"train": windows("train", cfg.seed),
            "eval": {s: windows(s, cfg.seed + 1) for s in ("train", "val")}}


def lr_multiplier(it: int, cfg) -> float:
    """Linear warmup, then cosine to min_lr, or (wsd) constant then a linear cooldown."""
    if not cfg.decay_lr:
        return 1.0
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    floor = cfg.min_lr / cfg.learning_rate
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return floor
    if cfg.lr_schedule == "wsd":
        start = decay_iters * (1 - cfg.cooldown_frac)
        return 1.0 if it < start else floor + (1 - floor) * (decay_iters - it) / (decay_iters - start)
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1 - floor)


def param_groups(model: GPT) -> tuple[list, list, list]:
    """(block matrices, other matrices, 1-D tensors): the one place that decides how parameters
    are optimized. AdamW decays every matrix and nothing 1-D (biases, gains); Muon takes the block
    matrices (attention and MLP inside transformer.h) and leaves embeddings and the head to
    AdamW. A tied matrix is listed once; frozen parameters not at all. LoRA adapters are
    low-rank factors, not the hidden matrices Muon orthogonalises: AdamW takes them."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    blocks, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            vectors.append(p)
        else:
            (blocks if id(p) in in_blocks and not is_adapter(name) else matrices).append(p)
    return blocks, matrices, vectors


def adamw(groups: list, cfg) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each tensor instead of foreach's several; on
    CPU about 6x faster a step, docs/lab-notes.md), or foreach where torch has no fused kernel
    for these parameters (device or dtype)."""
    settings = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.AdamW(groups, **settings, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, **settings)


def make_optimizers(cfg, model: GPT) -> list:
    blocks, matrices, vectors = param_groups(model)
    opts = []
    if cfg.optimizer == "muon":
        opts.append(make_muon(blocks, cfg))
        blocks = []
    groups = [{"params": blocks + matrices, "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    opts.append(adamw(groups, cfg))
    for opt in opts:  # the schedule scales each group from the rate it started with
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def step_seed(seed: int, rank: int, it: int) -> int:
    """The torch seed of one training step: random numbers (dropout) are a function of (seed,
    rank, iteration), so a resumed run draws what an uninterrupted one would, on any number of
    processes, without saving generator states."""
    return int(np.random.SeedSequence([seed, rank, it]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------- the objective

def balance_loss(model: GPT, mask: Tensor, reduction: str) -> Tensor:
    """The load-balancing loss of the last forward (Switch Transformer, per sequence as in
    DeepSeek-V3): per row, E * sum_e f_e P_e over the positions whose loss counts (mask
    (B, T), their weights), f_e the share of the row's top-k slots expert e took and P_e its
    mean router probability; 1 when balanced, E when one expert takes everything; averaged
    over layers. "sum" weighs each row by its count, like the cross-entropy sum, so the
    training loop's division by the step's target count makes it a mean per target that
    micro-batching and processes do not change; "mean" divides by the count here."""
    E, k = model.config.n_expert, model.config.moe_top_k
    mask = mask.float()
    n = mask.sum(1)  # (B,)
    total = torch.zeros((), device=mask.device)
    for block in model.transformer.h:
        picked = F.one_hot(block.mlp.chosen, E).sum(2).float()  # (B, T, E)
        f = (mask.unsqueeze(-1) * picked).sum(1) / (k * n.clamp(min=1e-8)).unsqueeze(-1)  # (B, E)
        P = (mask.unsqueeze(-1) * block.mlp.probs).sum(1) / n.clamp(min=1e-8).unsqueeze(-1)  # (B, E)
        total = total + (E * (f * P).sum(1) * n).sum()
    total = total / model.config.n_layer
    return total if reduction == "sum" else total / n.sum().clamp(min=1e-8)


class Objective(nn.Module):
    """What training minimizes, around the model: a micro-batch's cross-entropy summed over its
    targets (weighted by w when given), plus MoE's load-balancing loss summed the same way. The
    loop divides both by the targets of the whole optimizer step, so a short answer weighs as
    much per token as a long one. With loss_only (example datasets) the head runs only where a
    target counts: in SFT most positions are prompt or padding, and with a 50k vocabulary the
    head is most of a small model's work (finding them costs one host sync). DDP and compile
    wrap this module, so the model's own forward stays nanoGPT's."""

    def __init__(self, model: GPT, loss_only: bool):
        super().__init__()
        self.model, self.loss_only = model, loss_only

    def forward(self, x: Tensor, y: Tensor, w: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(summed loss, summed balancing loss or None) of x, y (B, T), weights w (B, T)."""
        model = self.model
        h = model.body(x)  # (B, T, C)
        aux = None
        if model.config.n_expert:
            aux = balance_loss(model, (y != -1) if w is None else w, "sum")
        if model.config.cls_head == "mlp":
            return model.class_loss(h, y, "sum"), aux
        y = y.reshape(-1)
        w = None if w is None else w.reshape(-1).float()
        if self.loss_only:
            rows = ((y != -1) if w is None else (w > 0)).nonzero().squeeze(1)  # (N,)
            y, w = y[rows], None if w is None else w[rows]
            flat = model.head(h.reshape(-1, h.size(-1))[rows]).float()  # (N, V)
        else:
            flat = model.head(h).float().view(-1, model.config.vocab_size)  # (B*T, V)
        if w is None:
            return F.cross_entropy(flat, y, ignore_index=-1, reduction="sum"), aux
        return (F.cross_entropy(flat, y, ignore_index=-1, reduction="none") * w).sum(), aux

    def count(self, y: Tensor, w: Tensor | None = None) -> Tensor:
        """How many targets the summed loss covers: the weights' sum (or the targets that are
        not -1); with the mlp head, one per example."""
        if self.model.config.cls_head == "mlp":
            return torch.isin(y, self.model.cls_ids).sum()
        return (y != -1).sum() if w is None else w.sum()


# ----------------------------------------------------------------------------- evaluation

def default_objective(model: GPT, loader) -> Objective:
    """The objective of pretraining, SFT and classification; another objective (e.g. one over
    preference pairs) is a module with the same forward(x, y, w) and count(y, w), and may add
    figures of its own to each evaluation with metrics(run) (dpo.py: rewards, preference accuracy)."""
    return Objective(model, loss_only=isinstance(loader, Examples))


@torch.no_grad()
def estimate_loss(model, loaders: dict, cfg, run: Runtime, make_objective=default_objective) -> dict:
    """Loss per target over up to eval_iters batches of each split (the same batches every
    time). eval_iters is global, like gradient_accumulation_steps: each process runs its share."""
    out = {}
    n_batches = math.ceil(cfg.eval_iters / run.world_size)
    model.eval()
    for split, loader in loaders.items():
        total = torch.zeros(2, device=run.device)  # summed loss, target count
        if isinstance(loader, Examples):
            batches = (b for _, b in loader.iter_batches(run.device, n_batches))
        else:
            loader.rewind()  # every evaluation sees the same windows
            batches = (loader.get_batch(run.device) for _ in range(n_batches))
        objective = make_objective(model, loader)
        for x, y, w in batches:
            with run.autocast:
                loss, _ = objective(x, y, w)
            n = objective.count(y, w)
            total += torch.stack([loss.float(), n.float()])
        loss_sum, count = all_reduce_sum(total, run).tolist()
        if count == 0:
            raise DataError(f"the {split} split has no training targets in its first "
                            f"{cfg.eval_iters} batches; check the dataset's loss masks")
        out[f"{split}_loss"] = loss_sum / count
        if hasattr(objective, "metrics"):  # summed over the same batches, on every rank
            out.update({f"{split}_{k}": v for k, v in objective.metrics(run).items()})
    model.train()
    return out


# ----------------------------------------------------------------------------- the loop

@dataclass
class StepResult:
    loss: float  # mean loss per target over the whole step (all micro-batches, all ranks)
    grad_norm: float
    seq_len: int
    skipped: bool  # the loss or gradient was not finite: no update was made
    stop: bool  # a process got Ctrl-C / SIGTERM
    aux_loss: float | None = None  # MoE: the load-balancing loss per target (before moe_aux_weight)


class Trainer:
    """The training loop shared by train.py and sft.py: evaluate, checkpoint, step, log.
    `state` is a ckpt.pt to resume from; `extra_eval(model)` adds metrics (val accuracy,
    sample replies) to each evaluation."""

    def __init__(self, cfg, run: Runtime, model: GPT, loaders: dict, tokenizer_meta: dict,
                 state: dict | None = None, extra_eval=None, lora_base: dict | None = None,
                 make_objective=default_objective):
        if cfg.gradient_accumulation_steps % run.world_size:
            raise ConfigError(f"gradient_accumulation_steps = {cfg.gradient_accumulation_steps} must "
                              f"be a multiple of the number of processes ({run.world_size}): it is "
                              "the global count, split across processes (e.g. "
                              f"--gradient_accumulation_steps={run.world_size})", "gradient_accumulation_steps")
        self.cfg, self.run, self.loaders, self.meta, self.extra_eval = cfg, run, loaders, tokenizer_meta, extra_eval
        self.lora_base = lora_base  # a LoRA run saves its adapters and this reference to the base
        self.raw_model = model  # what checkpoints hold: no compile or DDP wrapper prefixes
        resolve_cpu_dtype(run, model, cfg.batch_size, cfg.block_size, cfg.dtype, (state or {}).get("dtype"))
        # example datasets (SFT, classification): the head runs only where a target counts
        self.make_objective = make_objective
        self.objective = make_objective(model, loaders["train"])
        self.model = parallelize(self.objective, model, cfg, run)  # what a step calls (DDP, FSDP, compiled)
        self.sharded = is_sharded(model)
        self.optimizers = make_optimizers(cfg, model)  # after sharding: FSDP replaces the parameters
        self.iter_num, self.best_val_loss, self.elapsed0, self.saved_iter = 0, float("inf"), 0.0, None
        if state is not None:
            self.restore(state)
        self.start_iter, self.evaluated = self.iter_num, None
        self.accum = cfg.gradient_accumulation_steps // run.world_size
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # Each micro-batch's loss is a sum over its targets; backward runs on sum / norm, a
        # constant, and step() rescales the gradients to sum / (targets in the whole step) once
        # the count is known. For token windows the factor is exactly 1.
        self.norm = self.accum * cfg.batch_size * cfg.block_size
        self.peak = peak_flops(run.device, run.dtype)
        self.nonfinite, self.tokens_since, self.state_mb = 0, 0, None
        weighted = isinstance(loaders["train"], Examples) and 0 < cfg.prompt_loss_weight < 1
        self.loss_note = f" (targets + {cfg.prompt_loss_weight:g} x the rest)" if weighted else ""

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.start_time

    # ------------------------------------------------------------------ checkpoints

    def restore(self, state: dict) -> None:
        """Continue from a ckpt.pt (or ckpt.dcp/, each process reading its optimizer shards):
        optimizer moments, GradScaler, iteration, data position. Hyperparameters come from this
        run's config, not the checkpoint's: a changed learning_rate or weight_decay on resume
        takes effect (and config.json says so)."""
        fresh = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.optimizers]
        if state.get("shards"):
            load_sharded_optimizers(state["shards"], self.raw_model, self.optimizers)
        for opt, saved in zip(self.optimizers, state.get("optimizer") or []):
            load_optimizer_state(self.raw_model, opt, saved, self.sharded)
        for opt, groups in zip(self.optimizers, fresh):
            for group, settings in zip(opt.param_groups, groups):
                group.update(settings)
        if state.get("scaler"):
            self.run.scaler.load_state_dict(state["scaler"])
        self.iter_num, self.best_val_loss = state["iter_num"], state["best_val_loss"]
        self.elapsed0, self.saved_iter = state.get("elapsed_s", 0.0), state["iter_num"]
        if state.get("loader") is not None:
            self.loaders["train"].load_state_dict(state["loader"])
        else:
            print0("note: this checkpoint was written by an older danlu and holds no data "
                   "position; batches after the resume are drawn from the start of the stream")

    def weights_finite(self) -> bool:
        return all_ranks_finite([p.detach() for p in self.raw_model.parameters()], self.run)

    def save(self, best: bool = False) -> None:
        """ckpt (the whole training state) or best (the weights of the best evaluation): .pt,
        written by rank 0, or with sharded_checkpoint .dcp/, every process writing its shards.
        Weights that are not finite are never saved: training stops instead."""
        if not self.weights_finite():
            raise RuntimeError(f"the weights became non-finite by iter {self.iter_num} (an update "
                               f"blew up); nothing was saved; {self.kept()}. Lower learning_rate "
                               "(or raise warmup_iters) and train again.")
        model, name = self.raw_model, "best" if best else "ckpt"
        if self.cfg.sharded_checkpoint:  # nothing is gathered: each process writes what it holds
            shards = sharded_state(model, self.optimizers, weights_only=best)
            state, optimizers = shards["model"], None
        else:  # under FSDP every process takes part in the gather
            state = model_state(model, self.sharded)
            optimizers = None if best else [optimizer_state(model, opt, self.sharded) for opt in self.optimizers]
        if self.lora_base:  # the adapters only: the base is read again from its path
            state = {k: v for k, v in state.items() if is_adapter(k)}
        ckpt = {"model_config": config_dict(model.config), "train_config": config_dict(self.cfg),
                "tokenizer": self.meta, "iter_num": self.iter_num, "best_val_loss": self.best_val_loss}
        if self.lora_base:
            ckpt.update(lora_base=self.lora_base, lora=config_dict(model.lora))
        if not best:
            ckpt.update(dtype=self.run.dtype, optimizer=optimizers, parallel=self.cfg.parallel,
                        scaler=self.run.scaler.state_dict(), loader=self.loaders["train"].state_dict(),
                        elapsed_s=self.elapsed(), world_size=self.run.world_size)
        if self.cfg.sharded_checkpoint:
            shards["model"] = state
            save_sharded(os.path.join(self.cfg.out_dir, name + SHARDED), shards, ckpt, self.run.master)
        elif self.run.master:  # the others keep count below, as the next save is collective
            save_checkpoint(os.path.join(self.cfg.out_dir, name + ".pt"), {"model": state, **ckpt})
        if not best:
            self.saved_iter = self.iter_num

    def kept(self) -> str:
        """What is on disk to go back to, for messages that stop training."""
        if self.saved_iter is None:
            return "no checkpoint was written"
        kind = SHARDED + "/" if self.cfg.sharded_checkpoint else ".pt"
        return f"{self.cfg.out_dir}/ckpt{kind} from iter {self.saved_iter} is kept"

    def write_config(self) -> None:
        """config.json: the resolved config, written once every check has passed."""
        if self.run.master:
            with atomic_write(os.path.join(self.cfg.out_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config_dict(self.cfg), f, indent=1, ensure_ascii=False)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> bool:
        """Log val (and train) loss and extra metrics; save best.pt when val improves and
        ckpt.pt per the policy (checkpoint.py). True when the target is met."""
        cfg, it = self.cfg, self.iter_num
        # under FSDP the losses go through the sharded objective itself (its hooks gather the
        # weights), and the hooks that call the model directly run with the root's weights gathered
        objective = (lambda model, loader: self.model) if self.sharded else self.make_objective
        metrics = estimate_loss(self.raw_model, self.loaders["eval"], cfg, self.run, objective)
        if self.extra_eval is not None:
            with gathered(self.model):
                metrics.update(self.extra_eval(self.raw_model))
        val = metrics["val_loss"]
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if self.loss_note:  # a step's loss weighs the other tokens too; evaluation scores targets alone
            shown = shown.replace("train_loss", "train_loss (targets)").replace("val_loss", "val_loss (targets)")
        self.logger.log({"iter": it, "elapsed_s": round(self.elapsed(), 3), **metrics,
                         "val_ppl": math.exp(min(val, 50))}, f"eval {it}: {shown} ({self.elapsed():.1f}s)")
        self.logger.plot(cfg.out_dir)
        if not math.isfinite(val):  # never saved: such weights are no checkpoint to go back to
            cause = "finite but so large that the model overflows" if self.weights_finite() else "non-finite"
            raise RuntimeError(f"val loss is {val} at iter {it}: the weights are {cause}. Nothing "
                               f"was saved; {self.kept()}. Lower learning_rate (or raise "
                               "warmup_iters) and train again.")
        trained = it > self.start_iter or (it > 0 and self.saved_iter is None)
        if trained and not cfg.eval_only:
            if val < self.best_val_loss:
                self.best_val_loss = val
                self.save(best=True)
            if cfg.always_save_checkpoint:
                self.save()
        if cfg.target_val_loss > 0 and val <= cfg.target_val_loss:
            self.logger.log({"iter": it, "elapsed_s": round(self.elapsed(), 3), "event": "target_reached",
                             "val_loss": val}, f"reached val loss {val:.4f} <= {cfg.target_val_loss} "
                                               f"at iter {it} in {self.elapsed():.1f}s")
            return True
        return False

    # ------------------------------------------------------------------ one step

    def step(self, stop: bool = False) -> StepResult:
        """One optimizer step over `accum` micro-batches on every process. The loss is the mean
        over every target of the step (all micro-batches, all ranks), so an SFT batch with a
        3-token answer weighs as much per token as one with 300, and batch 8 x 1 equals 4 x 2
        equals 2 processes x 4. One collective carries the loss, the target count and the stop
        flag; one host sync reads them with the gradient norm."""
        run, cfg = self.run, self.cfg
        torch.manual_seed(step_seed(cfg.seed, run.rank, self.iter_num))
        mult = lr_multiplier(self.iter_num, cfg)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
        loss_sum = torch.zeros((), device=run.device)
        aux_sum = torch.zeros((), device=run.device)
        count = torch.zeros((), device=run.device)
        for micro in range(self.accum):
            x, y, w = self.loaders["train"].get_batch(run.device)
            self.tokens_since += x.numel() * run.world_size
            count += self.objective.count(y, w)
            # DDP: average gradients across processes on the last micro-step only
            last = micro == self.accum - 1
            with no_sync(self.model, last) if run.ddp else nullcontext():
                with run.autocast:
                    loss, aux = self.model(x, y, w)
                # MoE: the balancing loss is a sum over targets too, so it is scaled with the
                # cross-entropy below: a mean per target of the whole step
                total = loss if aux is None else loss + cfg.moe_aux_weight * aux
                run.scaler.scale(total / self.norm).backward()
            loss_sum += loss.detach().float()
            if aux is not None:
                aux_sum += aux.detach().float()
        flag = torch.tensor(float(stop), device=run.device)
        loss_sum, aux_sum, count, flag = all_reduce_sum(torch.stack([loss_sum, aux_sum, count, flag]), run)
        for opt in self.optimizers:
            run.scaler.unscale_(opt)
        # DDP averaged sum / norm over the ranks: scale to sum / count over the whole step
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, run.world_size * self.norm / count.clamp(min=1))
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss, aux, grad_norm, n, stop = torch.stack([loss_sum / count.clamp(min=1), aux_sum / count.clamp(min=1),
                                                     grad_norm.float(), count, flag]).tolist()
        # fp16's GradScaler skips overflowing steps by itself; otherwise a non-finite norm is bad.
        # Every rank holds the same reduced loss and gradients, so all agree on skipping.
        skipped = not math.isfinite(loss) or (run.dtype != "float16" and not math.isfinite(grad_norm))
        if not skipped and n > 0:  # a step without targets changes nothing
            for opt in self.optimizers:
                run.scaler.step(opt)
        run.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, x.size(1), skipped, stop > 0, aux if cfg.n_expert else None)

    def skipped(self) -> None:
        """Log a skipped step; after max_nonfinite in a row, stop and say what is on disk."""
        self.nonfinite += 1
        self.logger.log({"iter": self.iter_num, "elapsed_s": round(self.elapsed(), 3),
                         "event": "nonfinite_loss"}, f"iter {self.iter_num}: non-finite loss, step skipped")
        if self.nonfinite >= self.cfg.max_nonfinite:
            raise RuntimeError(f"{self.nonfinite} non-finite losses in a row at iter {self.iter_num}: "
                               f"training stopped; {self.kept()}. Lower learning_rate or check the data.")

    def log_step(self, result: StepResult) -> None:
        dt = time.time() - self.t_last
        tok_s = self.tokens_since / dt
        achieved = tok_s * self.raw_model.flops_per_token(result.seq_len)
        self.peak = max(self.peak, achieved)  # the model beat the matmul timing: that is the peak
        record = {"iter": self.iter_num, "elapsed_s": round(self.elapsed(), 3), "train_loss": result.loss,
                  "lr": self.optimizers[-1].param_groups[0]["lr"], "tok_per_s": round(tok_s, 1),
                  "mfu": round(achieved / self.peak, 4), "grad_norm": round(result.grad_norm, 4)}
        if result.aux_loss is not None:
            record["aux_loss"] = round(result.aux_loss, 5)
        if self.run.ddp:  # what this process holds: under FSDP about 1/N of DDP's; fixed once a step has run
            if self.state_mb is None:
                self.state_mb = {k: round(v / 1e6, 3) for k, v in shard_bytes(self.raw_model, self.optimizers).items()}
            record["state_mb"] = self.state_mb
        bar = self.logger.bar
        self.logger.log(record, None if bar is not None and not bar.disable else
                        f"iter {self.iter_num}: step loss {result.loss:.4f}{self.loss_note}, {tok_s:,.0f} tok/s, "
                        f"mfu {100 * record['mfu']:.1f}%")
        if bar is not None:
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
        self.t_last, self.tokens_since = time.time(), 0

    def fit(self) -> dict:
        """Train to max_iters (or the target, or a signal). Returns a summary: iterations, best
        val loss, elapsed seconds, why it stopped, the last evaluation."""
        cfg = self.cfg
        self.write_config()
        self.logger = Logger(cfg, self.run, self.iter_num, cfg.max_iters)
        signals, stopped = StopSignal(), "max_iters"
        self.start_time = self.t_last = time.time()
        try:
            while True:
                it = self.iter_num
                due = it % cfg.eval_interval == 0 or it >= cfg.max_iters or cfg.eval_only
                if due and it != self.evaluated:  # a skipped step does not evaluate twice
                    self.evaluated = it
                    if self.evaluate():
                        stopped = "target_val_loss"
                        break
                    self.t_last, self.tokens_since = time.time(), 0  # tok/s counts training only
                if it >= cfg.max_iters or cfg.eval_only:
                    break
                result = self.step(stop=signals.raised is not None)
                if result.skipped:
                    self.skipped()
                else:
                    self.nonfinite = 0
                    self.iter_num += 1
                    if self.logger.bar is not None:
                        self.logger.bar.update(1)
                    if self.iter_num % cfg.log_interval == 0 or self.iter_num == cfg.max_iters:
                        self.log_step(result)
                if result.stop:
                    stopped = "signal"
                    break
            if not cfg.eval_only and self.saved_iter != self.iter_num and self.iter_num > self.start_iter:
                self.save()  # always at the end: every finished run can be sampled and resumed
        finally:
            signals.restore()
            self.logger.close()
        if stopped == "signal":
            print0(f"\nstopped by {signals.raised or 'a signal on another rank'} after iter {self.iter_num}; "
                   f"checkpoint saved to {checkpoint_path(cfg.out_dir, 'ckpt')}. To resume, run the same command again "
                   "(train.py: with --init_from=resume or auto; sft.py resumes by itself)")
        last_eval = next((r for r in reversed(self.logger.records) if "val_loss" in r), None)
        return {"stopped": stopped, "iters": self.iter_num, "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed(), "last_eval": last_eval}


def done_line(summary: dict, out_dir: str) -> str:
    """What a finished run says: where its weights are, and the best val loss only if an
    evaluation after training found one (else there is no best.pt, only ckpt.pt)."""
    best = summary["best_val_loss"]
    ckpt, best_name = (os.path.basename(checkpoint_path(out_dir, n) or f"{n}.pt") for n in ("ckpt", "best"))
    saved = (f"best val loss {best:.4f} ({best_name}), last weights in {ckpt}" if math.isfinite(best) else
             f"no evaluation after training, so no {best_name}: {ckpt} holds the last weights")
    return f"done: {summary['iters']} iters in {summary['elapsed_s']:.1f}s; {out_dir}/: {saved}"


def train(cfg, run: Runtime, model: GPT, loaders: dict, tokenizer_meta: dict, state: dict | None = None,
          extra_eval=None, lora_base: dict | None = None, make_objective=default_objective) -> dict:
    """Run the shared training loop (see Trainer); returns its summary."""
    return Trainer(cfg, run, model, loaders, tokenizer_meta, state, extra_eval, lora_base, make_objective).fit()


# ----------------------------------------------------------------------------- entry point

# Keys that change training, not the network: these may differ on resume and from a base.
TRAINING_ONLY = ("dropout", "attn_impl", "moe_aux_weight")


def add_lora(model: GPT, cfg, new_ids: range) -> GPT:
    """The frozen base model with cfg's new LoRA adapters (and trainable rows for new_ids,
    the tokens the base lacks); cfg.lora_new_tokens_from is set so ckpt.pt tells the truth."""
    cfg.lora_new_tokens_from = new_ids.start if len(new_ids) else 0
    model = add_adapters(model, lora_config(cfg))
    report_trainable(model)
    return model


def report_trainable(model: GPT) -> None:
    trainable, total = freeze_base(model)
    print0(f"LoRA rank {model.lora.lora_rank} on {model.lora.lora_targets}: {trainable:,} of {total:,} parameters "
           f"train ({100 * trainable / total:.2f}%), the base is frozen")


def claim_run_folder(cfg, run: Runtime) -> None:
    """The output policy for out_dir: a folder that holds a run is resumed (init_from auto or
    resume), never replaced by a new one unless --overwrite asks for it, which says what goes.
    A stale best.pt of the replaced run is removed at once: sample.py would read it first."""
    found = {n: checkpoint_path(cfg.out_dir, n) for n in ("ckpt", "best")}
    held = [os.path.basename(p) for p in found.values() if p]
    if cfg.overwrite and cfg.init_from == "auto":
        cfg.init_from = "scratch"  # --overwrite asks to start over, not to resume what is there
    if not held or (cfg.init_from in ("auto", "resume") and found["ckpt"]):
        return
    if not cfg.overwrite:
        raise ConfigError(f"{cfg.out_dir} holds a run ({', '.join(held)}) that init_from = {cfg.init_from!r} would "
                          "replace; resume it (init_from = auto), pick another --out_dir, or pass --overwrite "
                          "to replace it", "out_dir")
    print0(f"--overwrite: a new run replaces the one in {cfg.out_dir} ({', '.join(held)}, log.jsonl)")
    if found["best"] and run.master:
        remove_sharded(os.path.join(cfg.out_dir, "best" + SHARDED))
        if os.path.isfile(os.path.join(cfg.out_dir, "best.pt")):
            os.remove(os.path.join(cfg.out_dir, "best.pt"))


def resume_state(cfg, run: Runtime, model_cfg: GPTConfig) -> dict | None:
    """out_dir's ckpt.pt (or sharded ckpt.dcp/: its weights whole, its optimizer shards read by
    Trainer.restore) to continue, or None for a fresh start (init_from scratch / auto without
    a checkpoint / another run's weights)."""
    path = checkpoint_path(cfg.out_dir, "ckpt") or os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from not in ("resume", "auto"):
        return None
    if not os.path.exists(path):
        if cfg.init_from == "auto":
            return None
        raise ConfigError(f"init_from = 'resume' but {path} does not exist; start a new run with "
                          "--init_from=auto (or scratch)", "init_from")
    state = load_checkpoint(path)
    if "optimizer" not in state:  # a sharded ckpt.dcp/ records optimizer = None, its shards hold it
        raise CheckpointError(f"{path} holds weights only (no optimizer state) and cannot be "
                              f"resumed; start a new run from it with --init_from={cfg.out_dir} "
                              "and another out_dir")
    saved = config_dict(gpt_config(state["model_config"]))  # keys newer than the checkpoint: defaults
    saved.update(config_dict(lora_config(state.get("lora", {}))))
    mine = {**config_dict(model_cfg), **config_dict(lora_config(cfg))}
    diff = {k: (saved.get(k), v) for k, v in mine.items()
            if saved.get(k) != v and k not in TRAINING_ONLY + ("lora_dropout", "lora_new_tokens_from")}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{path} was trained with a different model config ({shown}); use "
                          "the same config to resume, or another out_dir")
    if state.get("parallel", "ddp") != cfg.parallel:  # their optimizer states are laid out differently
        raise ConfigError(f"{path} was trained with parallel = {state.get('parallel', 'ddp')!r}; resume it with "
                          f"the same (on any number of processes)", "parallel")
    was = state["train_config"].get("dataset")
    if was != cfg.dataset:
        raise ConfigError(f"{path} was trained on dataset {was!r}, not {cfg.dataset!r}; resume "
                          f"continues the same run. To train its weights on other data, start a new "
                          f"run: --init_from={cfg.out_dir} --out_dir=<another folder>", "dataset")
    if state["iter_num"] >= cfg.max_iters:
        print0(f"{path} is at iter {state['iter_num']}, max_iters is {cfg.max_iters}: nothing left to train "
               "(raise --max_iters to go on, or train a new run with another --out_dir)")
    if state.get("world_size", run.world_size) != run.world_size:
        print0(f"note: the checkpoint was written by {state['world_size']} processes and this run "
               f"has {run.world_size}; each step reads the same windows, split differently")
    return state


def init_weights(cfg, meta: dict, model_cfg: GPTConfig) -> tuple[GPT, GPTConfig, dict | None]:
    """(model, its config, LoRA base reference or None): a fresh model, or (init_from = a run
    folder, a Hugging Face folder or a gpt2 name) those weights. Their architecture wins over
    the config's model keys, but for dropout, attn_impl and the LoRA keys; cfg is updated to it
    so config.json and ckpt.pt tell the truth; the dataset must be tokenized with their
    tokenizer (chat tokens appended are grown in). lora_rank > 0 freezes them beside adapters."""
    if cfg.init_from in ("scratch", "resume", "auto"):
        return GPT(model_cfg), model_cfg, None
    source = plain_checkpoint(cfg.init_from)
    source_cfg, source_meta = gpt_config(source["model_config"]), source["tokenizer"]
    check_fits_uint16(source_meta, cfg.init_from)
    if not same_base(source_meta, meta):
        raise ConfigError(f"init_from = {cfg.init_from}: the dataset {cfg.dataset} was not tokenized "
                          f"with its tokenizer; prepare it with python prepare/text.py --input ... "
                          f"--name ... --tokenizer={cfg.init_from}", "init_from")
    new_ids = range(source_meta["vocab_size"], meta["vocab_size"])
    config = gpt_config(source_cfg, block_size=min(cfg.block_size, source_cfg.block_size),
                        vocab_size=max(model_cfg.vocab_size, source_cfg.vocab_size),
                        **{k: getattr(cfg, k) for k in TRAINING_ONLY})
    model = base_model(source, config, new_ids)
    for key, value in config_dict(model.config).items():
        setattr(cfg, key, value)
    print0(f"starting from the weights of {cfg.init_from}")
    if not cfg.lora_rank:
        return model, model.config, None
    reference = base_reference(cfg.init_from, source)
    model = add_lora(model, cfg, new_ids)
    return model, model.config, reference


def prepare_run(cfg, run: Runtime) -> None:
    """Resolve the run folder, print the config, seed every RNG (the same initial weights on
    every rank; training steps reseed per rank, see step_seed)."""
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("weight", os.path.basename(cfg.dataset.rstrip("/")))
    print0(f"config (what differs from the defaults; all of it goes to {cfg.out_dir}/config.json):\n"
           + changed_settings(cfg))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)


def main(argv=None) -> dict:
    cfg = load_config(TrainConfig, sys.argv[1:] if argv is None else argv)
    run = setup_runtime(cfg.device, cfg.dtype, cfg.threads, cfg.dist_timeout)
    prepare_run(cfg, run)
    claim_run_folder(cfg, run)
    data_dir = dataset_dir(cfg.dataset)
    meta = load_meta(data_dir)
    model, model_cfg, lora_base = init_weights(cfg, meta, model_config_for(cfg, meta))
    if model_cfg.cls_head == "mlp":  # the head finds its targets by the class tokens' ids
        model.cls_ids.copy_(torch.tensor(class_token_ids(meta)))
    state = resume_state(cfg, run, model_cfg)
    if state is not None and state.get("lora_base"):  # adapters: their base comes from its path
        model, lora_base = lora_model(state, cfg.out_dir), state["lora_base"]
        del state["model"]
        cfg.lora_new_tokens_from = model.lora.lora_new_tokens_from
        report_trainable(model)
        print0(f"resuming from {checkpoint_path(cfg.out_dir, 'ckpt')} at iter {state['iter_num']}")
    elif state is not None:
        model.load_state_dict(state.pop("model"))  # no second copy of the weights for the run
        print0(f"resuming from {checkpoint_path(cfg.out_dir, 'ckpt')} at iter {state['iter_num']}")
    elif cfg.lora_rank and lora_base is None:
        raise ConfigError(f"lora_rank = {cfg.lora_rank} trains adapters on pretrained weights; give them "
                          "with --init_from=weight/<run>|HF_FOLDER|gpt2 (sft.py: --base=...)", "lora_rank")
    model.to(run.device)
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, device {run.device}"
           + (f", {run.threads_note}" if run.threads_note else ""))
    loaders = make_loaders(cfg, data_dir, meta, run, model_cfg.vocab_size)
    extra_eval = None
    if meta.get("task") == "classify":
        extra_eval = accuracy_eval(loaders["eval"]["val"], meta, run)
    summary = train(cfg, run, model, loaders, meta, state, extra_eval, lora_base)
    print0(done_line(summary, cfg.out_dir))
    return summary


if __name__ == "__main__":
    cli(main)
