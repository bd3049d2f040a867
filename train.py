"""
Pretraining, and the one training loop that sft.py reuses.

    python train.py config/shakespeare_char_cpu.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py

Flat token datasets are read as random block_size windows; example datasets (data/<name>/*.idx,
e.g. tiny_cls) as whole examples with their loss masks. The run folder weight/<run>/ gets
ckpt.pt, config.json, log.jsonl and loss.png. Ctrl-C / SIGTERM finishes the step, saves and exits.
"""
import dataclasses
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

from common import (ConfigError, Logger, Runtime, StopSignal, any_rank, cli, config_dict, gather,
                    load_checkpoint, load_config, peak_flops, print0, save_checkpoint, setup_runtime,
                    subset, sync_device)
from data import Examples, TokenWindows, dataset_dir, is_example_dataset
from model import GPT, GPTConfig
from tokenizer import load_meta


@dataclass
class TrainConfig(GPTConfig):
    # data and run folder
    dataset: str = "shakespeare_char"  # data/<dataset>/
    out_dir: str = ""  # default: weight/<dataset>
    init_from: str = "scratch"  # scratch | resume | auto (resume if out_dir has a checkpoint)
    vocab_size: int = 0  # 0: from the dataset's meta.json
    batch_size: int = 12  # per process, per micro-step
    gradient_accumulation_steps: int = 1  # global: divided by the number of processes
    prompt_loss_weight: float = 0.0  # example datasets: loss weight of tokens that are not targets
    # optimizer and schedule
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    learning_rate: float = 6e-4
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    max_iters: int = 5000
    decay_lr: bool = True
    lr_schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay)
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: max_iters
    cooldown_frac: float = 0.3  # wsd: the last fraction of lr_decay_iters decays linearly
    min_lr: float = 6e-5
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 200
    eval_only: bool = False
    log_interval: int = 10
    always_save_checkpoint: bool = True
    target_val_loss: float = 0.0  # >0: stop at the first eval at or below it
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    wandb_log: bool = False
    wandb_project: str = "danlu"
    wandb_run_name: str = ""
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337


# ----------------------------------------------------------------------------- setup

def model_config_for(cfg, meta: dict) -> GPTConfig:
    """The model's config: the GPTConfig keys of cfg, vocab_size from meta.json unless set.
    A BPE-sized vocabulary is padded to a multiple of 64, which matmuls run faster on."""
    vocab_size, v = cfg.vocab_size, meta["vocab_size"]
    if vocab_size == 0:
        vocab_size = 64 * math.ceil(v / 64) if v >= 1024 else v
    elif vocab_size < v:
        raise ConfigError(f"vocab_size = {vocab_size} is smaller than the dataset's {v}; leave "
                          "it at 0 to take the dataset's", key="vocab_size")
    return subset(GPTConfig, dataclasses.replace(cfg, vocab_size=vocab_size))


def make_loaders(cfg, data_dir: str, meta: dict, run: Runtime, vocab_size: int) -> dict:
    """Train batches for this rank, plus fixed evaluation batches for each split."""
    if is_example_dataset(data_dir):
        def make(split, shuffle, weight):
            return Examples(data_dir, split, cfg.block_size, cfg.batch_size, vocab_size, cfg.seed,
                            run.rank, run.world_size, shuffle, weight)
        # Evaluation scores the targets alone (answers, class tokens) however much weight the
        # other tokens get in training, so val_loss always means the loss on answers; with
        # prompt_loss_weight >= 1 every token is a target, in training and in evaluation.
        eval_weight = 1.0 if cfg.prompt_loss_weight >= 1 else 0.0
        return {"train": make("train", True, cfg.prompt_loss_weight),
                "eval": {s: make(s, False, eval_weight) for s in ("train", "val")}}

    def windows(split, seed):
        return TokenWindows(data_dir, split, cfg.block_size, cfg.batch_size, vocab_size, seed, run.rank)
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


def make_optimizers(cfg, model: GPT, run: Runtime) -> list:
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        opts = [model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, run.device_type)]
    elif cfg.optimizer == "muon":
        from muon import make_muon_optimizers
        opts = make_muon_optimizers(model, cfg, run.device_type)
    else:
        raise ConfigError(f"optimizer = {cfg.optimizer!r}: choose adamw or muon")
    for opt in opts:  # the schedule scales each group from the rate it started with
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
    return opts


def rng_state(loader) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate(), "loader": loader.state_dict()}


def set_rng_state(state: dict, loader) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    random.setstate(state["python"])
    loader.load_state_dict(state["loader"])


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_loss(model, loaders: dict, cfg, run: Runtime) -> dict:
    """Mean loss over up to eval_iters batches of each split (the same batches every time).
    eval_iters is global, like gradient_accumulation_steps: each process runs its share."""
    out = {}
    n_batches = math.ceil(cfg.eval_iters / run.world_size)
    model.eval()
    for split, loader in loaders.items():
        total, count = torch.zeros(2, device=run.device), 0
        if isinstance(loader, Examples):
            batches = (b for _, b in loader.iter_batches(run.device, n_batches))
        else:  # reseed so every evaluation sees the same windows
            loader.rng = np.random.Generator(np.random.PCG64([cfg.seed + 1, run.rank]))
            batches = (loader.get_batch(run.device) for _ in range(n_batches))
        for x, y, w in batches:
            with run.autocast:
                _, loss = model(x, y, w, loss_only=isinstance(loader, Examples))
            n = (y != -1).sum() if w is None else w.sum()
            total += torch.stack([loss.float() * n, n.float()])
            count += 1
        if run.ddp:
            import torch.distributed as dist
            dist.all_reduce(total)
        out[f"{split}_loss"] = (total[0] / total[1].clamp(min=1)).item()
    model.train()
    return out


# ----------------------------------------------------------------------------- the loop

class PhaseClock:
    """tick(name) adds the seconds since the last tick to phases[name], after syncing the device
    so that queued GPU work lands in the phase that queued it. With phases None it does nothing."""

    def __init__(self, phases: dict | None, device: str):
        self.phases, self.device, self.t = phases, device, 0.0

    def __call__(self, name: str | None = None) -> None:
        if self.phases is None:
            return
        sync_device(self.device)
        now = time.perf_counter()
        if name is not None:
            self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now


class Trainer:
    """The training loop shared by train.py and sft.py: evaluate, checkpoint, step, log.
    `state` is a checkpoint to resume from; `extra_eval(model)` adds metrics (val accuracy,
    sample replies) to each evaluation."""

    def __init__(self, cfg, run: Runtime, model: GPT, loaders: dict, tokenizer_meta: dict,
                 state: dict | None = None, extra_eval=None):
        if cfg.gradient_accumulation_steps % run.world_size:
            raise ConfigError(f"gradient_accumulation_steps = {cfg.gradient_accumulation_steps} must "
                              f"be a multiple of the number of processes ({run.world_size}): it is "
                              "the global count, split across processes (e.g. "
                              f"--gradient_accumulation_steps={run.world_size})")
        self.cfg, self.run, self.loaders, self.meta, self.extra_eval = cfg, run, loaders, tokenizer_meta, extra_eval
        self.raw_model = model  # what checkpoints hold: no compile or DDP wrapper prefixes
        self.optimizers = make_optimizers(cfg, model, run)
        self.iter_num, self.best_val_loss, self.elapsed0 = 0, float("inf"), 0.0
        if state is not None:
            for opt, opt_state in zip(self.optimizers, state["optimizer"]):
                opt.load_state_dict(opt_state)
            self.iter_num, self.best_val_loss = state["iter_num"], state["best_val_loss"]
            self.elapsed0 = state.get("elapsed_s", 0.0)
            set_rng_state(state["rng"][run.rank], loaders["train"])
        if cfg.compile:
            model = torch.compile(model)
        if run.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
        self.model = model
        self.accum = cfg.gradient_accumulation_steps // run.world_size
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.peak = peak_flops(run.device, run.dtype)
        self.nonfinite, self.tokens_since = 0, 0
        # example datasets (SFT, classification): the head runs only where a target counts
        self.loss_only = isinstance(loaders["train"], Examples)

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.start_time

    def checkpoint(self) -> None:
        rng = gather(rng_state(self.loaders["train"]), self.run)  # every rank's, for exact resume
        if self.run.master:
            opt_states = [opt.state_dict() for opt in self.optimizers]
            save_checkpoint(os.path.join(self.cfg.out_dir, "ckpt.pt"), {
                "model": self.raw_model.state_dict(), "model_config": config_dict(self.raw_model.config),
                "train_config": config_dict(self.cfg), "tokenizer": self.meta, "optimizer": opt_states,
                "iter_num": self.iter_num, "best_val_loss": self.best_val_loss, "rng": rng,
                "elapsed_s": self.elapsed()})

    def evaluate(self) -> bool:
        """Log val (and train) loss and extra metrics, checkpoint; True when the target is met."""
        cfg, it = self.cfg, self.iter_num
        metrics = estimate_loss(self.raw_model, self.loaders["eval"], cfg, self.run)
        if self.extra_eval is not None:
            metrics.update(self.extra_eval(self.raw_model))
        val = metrics["val_loss"]
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.logger.log({"iter": it, "elapsed_s": round(self.elapsed(), 3), **metrics,
                         "val_ppl": math.exp(min(val, 50))}, f"eval {it}: {shown} ({self.elapsed():.1f}s)")
        self.logger.plot(cfg.out_dir)
        improved = val < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val)
        if it > 0 and (improved or cfg.always_save_checkpoint) and not cfg.eval_only:
            self.checkpoint()
        if cfg.target_val_loss > 0 and val <= cfg.target_val_loss:
            self.logger.log({"iter": it, "elapsed_s": round(self.elapsed(), 3), "event": "target_reached",
                             "val_loss": val}, f"reached val loss {val:.4f} <= {cfg.target_val_loss} "
                                               f"at iter {it} in {self.elapsed():.1f}s")
            return True
        return False

    def step(self, phases: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """One optimizer step over `accum` micro-batches: (loss, grad norm, seq len), or None when
        the loss was not finite and the step was skipped. With `phases` (bench.py), the seconds
        spent on data, forward, backward and optimizer are added to it; each boundary then syncs
        the device, so leave it None when speed matters."""
        run, mult = self.run, lr_multiplier(self.iter_num, self.cfg)
        tick = PhaseClock(phases, run.device)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
        loss_sum = torch.zeros((), device=run.device)
        for micro in range(self.accum):
            tick()
            x, y, w = self.loaders["train"].get_batch(run.device)
            self.tokens_since += x.numel() * run.world_size
            tick("data")
            # DDP: average gradients across processes on the last micro-step only
            last = micro == self.accum - 1
            with nullcontext() if not run.ddp or last else self.model.no_sync():
                with run.autocast:
                    loss = self.model(x, y, w, loss_only=self.loss_only)[1] / self.accum
                tick("forward")
                run.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            tick("backward")
        for opt in self.optimizers:
            run.scaler.unscale_(opt)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        # fp16's GradScaler skips overflowing steps by itself; otherwise a non-finite norm is bad
        bad = not math.isfinite(loss_sum.item()) or (run.dtype != "float16" and not math.isfinite(grad_norm.item()))
        skip = any_rank(bad, run)  # every rank skips together, or none does
        if not skip:
            for opt in self.optimizers:
                run.scaler.step(opt)
        run.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        tick("optimizer")
        return None if skip else (loss_sum, grad_norm, x.size(1))

    def skipped(self) -> None:
        """Log a skipped step; after max_nonfinite in a row, stop with the last checkpoint kept."""
        self.nonfinite += 1
        self.logger.log({"iter": self.iter_num, "elapsed_s": round(self.elapsed(), 3),
                         "event": "nonfinite_loss"}, f"iter {self.iter_num}: non-finite loss, step skipped")
        if self.nonfinite >= self.cfg.max_nonfinite:
            raise RuntimeError(f"{self.nonfinite} non-finite losses in a row at iter {self.iter_num}: "
                               f"training stopped. The last good checkpoint in {self.cfg.out_dir} is "
                               "kept; lower learning_rate or check the data.")

    def log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, seq_len: int) -> None:
        dt = time.time() - self.t_last
        tok_s = self.tokens_since / dt
        mfu = tok_s * self.raw_model.flops_per_token(seq_len) / self.peak if self.peak else 0.0
        record = {"iter": self.iter_num, "elapsed_s": round(self.elapsed(), 3), "train_loss": loss.item(),
                  "lr": self.optimizers[0].param_groups[0]["lr"], "tok_per_s": round(tok_s, 1),
                  "mfu": round(mfu, 4), "grad_norm": round(grad_norm.item(), 4)}
        bar = self.logger.bar
        self.logger.log(record, None if bar is not None and not bar.disable else
                        f"iter {self.iter_num}: loss {record['train_loss']:.4f}, {tok_s:,.0f} tok/s, "
                        f"mfu {100 * mfu:.1f}%")
        if bar is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
        self.t_last, self.tokens_since = time.time(), 0

    def fit(self) -> dict:
        """Train to max_iters (or the target, or a signal). Returns a summary: iterations, best
        val loss, elapsed seconds, why it stopped, the last evaluation."""
        cfg = self.cfg
        self.logger = Logger(cfg, self.run, self.iter_num, cfg.max_iters)
        stop, stopped = StopSignal(), "max_iters"
        self.start_time = self.t_last = time.time()
        try:
            while True:
                if self.iter_num % cfg.eval_interval == 0 or self.iter_num >= cfg.max_iters or cfg.eval_only:
                    if self.evaluate():
                        stopped = "target_val_loss"
                        break
                if self.iter_num >= cfg.max_iters or cfg.eval_only:
                    break
                result = self.step()
                if result is None:
                    self.skipped()
                    continue
                self.nonfinite = 0
                self.iter_num += 1
                if self.logger.bar is not None:
                    self.logger.bar.update(1)
                if self.iter_num % cfg.log_interval == 0 or self.iter_num == cfg.max_iters:
                    self.log_step(*result)
                if any_rank(stop.raised is not None, self.run):
                    stopped = "signal"
                    break
            if not cfg.eval_only:
                self.checkpoint()  # always at the end: every finished run can be sampled and resumed
        finally:
            stop.restore()
            self.logger.close()
        if stopped == "signal":
            print0(f"\nstopped by {stop.raised or 'a signal on another rank'} after iter {self.iter_num}; "
                   f"checkpoint saved to {cfg.out_dir}/ckpt.pt. To resume, run the same command again "
                   "(train.py: with --init_from=resume or auto; sft.py resumes by itself)")
        last_eval = next((r for r in reversed(self.logger.records) if "val_loss" in r), None)
        return {"stopped": stopped, "iters": self.iter_num, "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed(), "last_eval": last_eval}


def train(cfg, run: Runtime, model: GPT, loaders: dict, tokenizer_meta: dict,
          state: dict | None = None, extra_eval=None) -> dict:
    """Run the shared training loop (see Trainer); returns its summary."""
    return Trainer(cfg, run, model, loaders, tokenizer_meta, state, extra_eval).fit()


# ----------------------------------------------------------------------------- entry point

def resume_state(cfg, run: Runtime, model_cfg: GPTConfig) -> dict | None:
    """The checkpoint to resume from, or None for a fresh start (init_from scratch/resume/auto)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "scratch":
        return None
    if cfg.init_from not in ("resume", "auto"):
        raise ConfigError(f"init_from = {cfg.init_from!r}: choose scratch, resume or auto")
    if not os.path.exists(path):
        if cfg.init_from == "auto":
            return None
        raise ConfigError(f"init_from = 'resume' but {path} does not exist; start with "
                          "--init_from=scratch (or auto)")
    state = load_checkpoint(path, map_location=run.device)
    saved = state["model_config"]
    diff = {k: (saved.get(k), v) for k, v in config_dict(model_cfg).items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{path} was trained with a different model config ({shown}); use "
                          "the same config to resume, or another out_dir")
    if len(state["rng"]) != run.world_size:
        print0(f"note: the checkpoint was written by {len(state['rng'])} processes and this run "
               f"has {run.world_size}; data order will differ from an uninterrupted run")
        state["rng"] = [state["rng"][r % len(state["rng"])] for r in range(run.world_size)]
    return state


def prepare_run(cfg, run: Runtime) -> None:
    """Resolve the run folder, print the config, save config.json, seed every RNG."""
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("weight", os.path.basename(cfg.dataset.rstrip("/")))
    print0("config:", json.dumps(config_dict(cfg), indent=None))
    if run.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(config_dict(cfg), f, indent=1)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)


def main(argv=None) -> dict:
    cfg = load_config(TrainConfig, sys.argv[1:] if argv is None else argv)
    run = setup_runtime(cfg.device, cfg.dtype)
    prepare_run(cfg, run)
    data_dir = dataset_dir(cfg.dataset)
    meta = load_meta(data_dir)
    model_cfg = model_config_for(cfg, meta)
    state = resume_state(cfg, run, model_cfg)
    model = GPT(model_cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        print0(f"resuming from {cfg.out_dir}/ckpt.pt at iter {state['iter_num']}")
    model.to(run.device)
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, device {run.device}, dtype {run.dtype}")
    loaders = make_loaders(cfg, data_dir, meta, run, model_cfg.vocab_size)
    extra_eval = None
    if meta.get("task") == "classify":
        from classify import accuracy_eval
        extra_eval = accuracy_eval(loaders["eval"]["val"], meta, run)
    summary = train(cfg, run, model, loaders, meta, state, extra_eval)
    print0(f"done: {summary['iters']} iters, best val loss {summary['best_val_loss']:.4f}, "
           f"{summary['elapsed_s']:.1f}s; checkpoint in {cfg.out_dir}/ckpt.pt")
    return summary


if __name__ == "__main__":
    cli(main)
