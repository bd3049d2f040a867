"""
Throughput benchmarks for any training config: prints a table and writes JSON.

    python bench.py config/shakespeare_char_cpu.py [--key=value ...] [--out=bench.json]

Measures, with the real pieces of train.py (model, optimizers, data loader, precision):
  - the device's matmul peak: a large square matmul, float32 on CPU, bfloat16 on GPU;
  - training tokens/s and MFU against that measured peak (and against the peak train.py logs
    MFU with: the datasheet's for known GPUs);
  - where a training step's time goes: data, forward, backward, optimizer (clip + step), timed
    inside train.py's own Trainer.step;
  - greedy sampling tokens/s with the KV cache and with nanoGPT's exact crop (use_cache=False),
    outputs asserted identical while the text fits block_size;
  - data-loader batches/s.
Without the config's dataset on disk, training reads uniformly random tokens instead.
"""
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import checkpoint_path, load_model
from data import DataError, dataset_dir
from engine import generate as decode
from files import atomic_write
from model import GPT, GPTConfig
from runtime import measure_matmul_flops, peak_flops, print0, resolve_cpu_dtype, setup_runtime, sync_device
from settings import ConfigError, cli, config_dict, load_config
from tokenizer import load_meta
from train import TrainConfig, Trainer, make_loaders, model_config_for


@dataclass
class BenchConfig(TrainConfig):
    bench_warmup: int = 20  # untimed steps first (compilation, allocator, caches; 5 read ~5% low on CPU)
    bench_iters: int = 20  # timed training steps, for tokens/s and again for the phase split
    sample_tokens: int = 500  # greedy tokens generated with and without the KV cache
    sample_prompt: int = 1  # prompt length in tokens
    loader_batches: int = 200  # batches drawn to time the data loader
    peak_size: int = 0  # side of the square peak matmul; 0: 1024 on CPU, 8192 on GPU
    peak_seconds: float = 1.0  # the peak is the best of repeated matmuls over this long
    out: str = ""  # JSON path; "": weight/bench/<config name>.json


class RandomTokens:
    """Stands in for the data loader when the config's dataset is not on disk."""

    def __init__(self, cfg, vocab_size: int):
        self.shape, self.vocab_size = (cfg.batch_size, cfg.block_size), vocab_size
        self.g = torch.Generator().manual_seed(cfg.seed)

    def get_batch(self, device="cpu"):
        w = torch.randint(0, self.vocab_size, (self.shape[0], self.shape[1] + 1), generator=self.g)
        return w[:, :-1].to(device), w[:, 1:].to(device), None


def build(cfg, run):
    """(model, train loader, where the data came from), as train.py would build them. With
    init_from = resume (or auto and a checkpoint in out_dir) the model is the trained one, so
    sampling measures real text rather than a random model's near-ties."""
    try:
        data_dir = dataset_dir(cfg.dataset)
    except DataError:
        data_dir = None
    meta = load_meta(data_dir) if data_dir is not None else {"vocab_size": cfg.vocab_size or 50304}
    out_dir = cfg.out_dir or os.path.join("weight", os.path.basename(cfg.dataset.rstrip("/")))
    ckpt_path = checkpoint_path(out_dir, "ckpt") or os.path.join(out_dir, "ckpt.pt")  # .pt or sharded .dcp/
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "resume" or (cfg.init_from == "auto" and os.path.exists(ckpt_path)):
        model, _ = load_model(ckpt_path, run.device)
        for f in dataclasses.fields(GPTConfig):  # train with the checkpoint's shape
            setattr(cfg, f.name, getattr(model.config, f.name))
    else:
        model = GPT(model_config_for(cfg, meta)).to(run.device)
    if data_dir is not None:
        loader = make_loaders(cfg, data_dir, meta, run, model.config.vocab_size)["train"]
    else:
        loader = RandomTokens(cfg, model.config.vocab_size)
    return model, loader, data_dir or "random tokens"


def timed(fn, n: int, device: str) -> list[float]:
    """Seconds of each of n calls of fn(), the device synced around each."""
    seconds = []
    for _ in range(n):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def phase_split(trainer, n: int) -> dict:
    """Median seconds per step of: reading the step's batches, their forward passes, forward +
    backward, and a whole Trainer.step; backward and the optimizer are the differences. Timed
    beside the loop, never inside it, so the step train.py runs carries no timers."""
    run, model = trainer.run, trainer.model
    loader = trainer.loaders["train"]
    batches = [loader.get_batch(run.device) for _ in range(trainer.accum)]

    def forward(backward: bool):
        for x, y, w in batches:
            with run.autocast:
                loss = trainer.objective(x, y, w)[0] / trainer.norm
            if backward:
                loss.backward()
        model.zero_grad(set_to_none=True)

    def data():
        for _ in range(trainer.accum):
            loader.get_batch(run.device)
    median = {name: statistics.median(timed(fn, n, run.device)) for name, fn in (
        ("data", data), ("forward", lambda: forward(False)), ("forward_backward", lambda: forward(True)),
        ("step", trainer.step))}
    return {"data": median["data"], "forward": median["forward"],
            "backward": max(0.0, median["forward_backward"] - median["forward"]),
            "optimizer": max(0.0, median["step"] - median["data"] - median["forward_backward"])}


def bench_training(cfg, run, model, loader, peak: float) -> dict:
    trainer = Trainer(cfg, run, model, {"train": loader}, tokenizer_meta={})
    model.train()
    results = []
    timed(lambda: results.append(trainer.step()), cfg.bench_warmup, run.device)
    steady = timed(lambda: results.append(trainer.step()), cfg.bench_iters, run.device)
    if any(r.skipped for r in results):
        raise RuntimeError("the loss was not finite during the benchmark; check the config")
    phases = phase_split(trainer, cfg.bench_iters)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    # the median step: robust to a few steps slowed by other processes on a shared machine
    step_s = statistics.median(steady)
    tok_s = tokens_per_iter / step_s
    flops_per_token = model.flops_per_token(results[-1].seq_len)
    phase_total = sum(phases.values())
    return {
        "tokens_per_iter": tokens_per_iter,
        "ms_per_iter": 1e3 * step_s,
        "ms_per_iter_mean": 1e3 * statistics.mean(steady),
        "ms_per_iter_min": 1e3 * min(steady),
        "tokens_per_s": tok_s,
        "flops_per_token": flops_per_token,
        "achieved_flops": tok_s * flops_per_token,
        "mfu": tok_s * flops_per_token / max(peak, tok_s * flops_per_token),
        "split_ms_per_iter": {k: 1e3 * v for k, v in phases.items()},
        "split_fraction": {k: v / phase_total for k, v in phases.items()},
        "final_loss": results[-1].loss,
    }


def bench_sampling(cfg, run, model) -> dict:
    """Greedy generation of sample_tokens with and without the KV cache, from the same prompt,
    timed in the run's precision. The two must agree token for token while the text fits
    block_size (past it the cache shifts the context, see engine.generate_stream); in reduced
    precision (or TF32) the two paths round differently and a near-tie can flip, so there the
    check reruns both in strict float32."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, cfg.sample_prompt), generator=g).to(run.device)

    def generate(use_cache):
        return decode(model, prompt, cfg.sample_tokens, temperature=0.0, use_cache=use_cache)

    out, seconds = {}, {}
    for use_cache in (True, False):
        with run.autocast:
            decode(model, prompt, 4, temperature=0.0, use_cache=use_cache)  # warm up
            sync_device(run.device)
            t0 = time.perf_counter()
            out[use_cache] = generate(use_cache)
            sync_device(run.device)
        seconds[use_cache] = time.perf_counter() - t0
    strict = run.dtype == "float32" and not (run.device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    if not strict:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        out = {use_cache: generate(use_cache) for use_cache in (True, False)}
        torch.backends.cuda.matmul.allow_tf32 = tf32
    n = out[True].size(1) - prompt.size(1)
    # the tokens predicted from a whole context: up to the one after a full window
    within_window = max(0, min(n, model.config.block_size + 1 - prompt.size(1)))
    fits = prompt.size(1) + within_window
    identical = torch.equal(out[True][:, :fits], out[False][:, :fits])
    assert identical, "greedy generation with the KV cache differs from full recomputation"
    model.train()
    return {"new_tokens": n, "prompt_tokens": cfg.sample_prompt, "block_size": model.config.block_size,
            "tokens_within_window": within_window,
            "kv_cache_tokens_per_s": n / seconds[True], "no_cache_tokens_per_s": n / seconds[False],
            "speedup": seconds[False] / seconds[True], "identical": identical,
            "identity_checked_in": "timed run" if strict else "float32 rerun"}


def bench_loader(cfg, run, loader) -> dict:
    loader.get_batch(run.device)
    t0 = time.perf_counter()
    for _ in range(cfg.loader_batches):
        loader.get_batch(run.device)
    sync_device(run.device)
    dt = time.perf_counter() - t0
    return {"batches_per_s": cfg.loader_batches / dt,
            "tokens_per_s": cfg.loader_batches * cfg.batch_size * cfg.block_size / dt}


def device_name(run) -> str:
    if run.device_type == "cuda":
        return torch.cuda.get_device_name(run.device)
    return platform.processor() or platform.machine()


def report(result: dict) -> str:
    tr, sm, ld = result["train"], result["sampling"], result["loader"]
    rows = [
        ("device", f"{result['device_name']} ({result['device']}, {result['threads']} threads)"),
        ("measured matmul peak", f"{result['peak_flops'] / 1e9:,.1f} GFLOP/s ({result['peak_dtype']}, "
                                 f"{result['peak_size']}^2)"),
        ("model", f"{result['params'] / 1e6:.2f}M params, {tr['flops_per_token'] / 1e6:.2f} MFLOP/token"),
        ("training", f"{tr['tokens_per_s']:,.0f} tok/s, {tr['ms_per_iter']:.1f} ms/iter "
                     f"({tr['tokens_per_iter']} tok/iter, {result['dtype']})"),
        ("MFU (measured peak)", f"{100 * tr['mfu']:.1f}%  ({tr['achieved_flops'] / 1e9:,.1f} GFLOP/s)"),
    ]
    rows.append(("MFU (train.py's peak)", f"{100 * result['mfu_train_py']:.1f}%  (against "
                 f"{result['peak_flops_train_py'] / 1e9:,.1f} GFLOP/s)"))
    split = ", ".join(f"{k} {v:.1f} ms ({100 * tr['split_fraction'][k]:.0f}%)"
                      for k, v in tr["split_ms_per_iter"].items())
    rows += [
        ("step split", split),
        ("sampling, KV cache", f"{sm['kv_cache_tokens_per_s']:,.1f} tok/s"),
        ("sampling, exact crop", f"{sm['no_cache_tokens_per_s']:,.1f} tok/s"),
        ("KV cache speedup", f"{sm['speedup']:.2f}x over {sm['new_tokens']} tokens, greedy outputs "
                             f"identical for the {sm['tokens_within_window']} that fit in block_size "
                             f"{sm['block_size']} (past it the cache shifts the context)"),
        ("data loader", f"{ld['batches_per_s']:,.0f} batches/s ({ld['tokens_per_s'] / 1e6:.2f}M tok/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(BenchConfig, argv)
    run = setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    if run.ddp:
        raise ConfigError("bench.py measures one process; run it with python, not torchrun")
    config_name = os.path.splitext(os.path.basename(argv[0]))[0] if argv and not argv[0].startswith("--") else "default"
    out_path = cfg.out or os.path.join("weight", "bench", f"{config_name}.json")
    torch.manual_seed(cfg.seed)

    gpu = run.device_type == "cuda"
    model, loader, source = build(cfg, run)
    # the dtype the Trainer will train in (its own call then reads the cached choice)
    resolve_cpu_dtype(run, model, cfg.batch_size, cfg.block_size, cfg.dtype)
    peak_dtype = torch.bfloat16 if gpu else run.ptdtype
    # best of many short timings: on a shared CPU a few of them still see the whole machine
    peak_size = cfg.peak_size or (8192 if gpu else 1024)
    peak = measure_matmul_flops(run.device, peak_dtype, n=peak_size, seconds=cfg.peak_seconds)
    print0(f"bench: {config_name}, {model.num_params() / 1e6:.2f}M params, data: {source}")

    result = {"config_name": config_name, "device": run.device, "device_name": device_name(run),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": run.dtype,
              "compile": cfg.compile, "optimizer": cfg.optimizer, "data": source,
              "peak_flops": peak, "peak_dtype": str(peak_dtype).replace("torch.", ""),
              "peak_size": peak_size, "params": model.num_params()}
    result["train"] = bench_training(cfg, run, model, loader, peak)
    # the peak train.py logs MFU against: the datasheet's for known GPUs, else a timed matmul
    result["peak_flops_train_py"] = peak_flops(run.device, run.dtype)
    result["mfu_train_py"] = result["train"]["achieved_flops"] / max(result["peak_flops_train_py"],
                                                                     result["train"]["achieved_flops"])
    result["sampling"] = bench_sampling(cfg, run, model)
    result["loader"] = bench_loader(cfg, run, loader)
    result["config"] = config_dict(cfg)
    result["model_config"] = config_dict(model.config)

    print0(report(result))
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with atomic_write(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print0(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    cli(main)
