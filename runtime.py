"""
The run's machine: device, dtype and (under torchrun) the process group, CPU dtype and peak
measurements kept per machine, rank-0 printing, the training log (log.jsonl, loss.png, progress
bar, wandb) and stop signals. Settings live in settings.py, files in files.py.
"""
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext

import torch

from files import atomic_write
from settings import ConfigError, config_dict


# ----------------------------------------------------------------------------- runtime

@dataclasses.dataclass
class Runtime:
    device: str
    device_type: str
    dtype: str
    ptdtype: torch.dtype
    autocast: object
    scaler: object
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    threads_note: str = ""  # how many CPU threads and why, for the training log

    @property
    def master(self) -> bool:
        return self.rank == 0


def pick_device(device: str) -> str:
    """auto: cuda, then mps, then cpu. An explicit device this machine lacks is a ConfigError."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"device = {device!r}: no CUDA here ({build}); use --device=cpu (or auto)", "device")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device = {device!r}: no Apple GPU here; use --device=cpu (or auto)", "device")
    if kind not in ("cpu", "cuda", "mps", "meta"):
        raise ConfigError(f"device = {device!r}: choose auto, cpu, cuda, cuda:N or mps", "device")
    return device


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse instead of handing them back to the
    kernel. A CPU training step frees and reallocates the same large buffers: the logits alone
    are B*T*vocab floats, 400 MB for a GPT-2 vocabulary at batch 8 x 256. By default glibc maps
    each such block afresh and unmaps it on free, so every step pays page faults and zeroing in
    the kernel: 2x slower steps on the GPT-2-BPE base of config/pretrain_gpt2_small_cpu.py
    (docs/lab-notes.md). One arena keeps every thread on the same reusable heap. The cost:
    RSS stays at its peak. True when set; False off glibc (macOS, musl), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # <malloc.h>
    settings = ((m_arena_max, 1), (m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def busy_cores(seconds: float = 0.25) -> float:
    """How many cores other work keeps busy now: the machine's non-idle CPU time over a short
    look (/proc/stat). Not the load average, which still counts a job that ended a minute ago."""
    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):  # not Linux
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def pick_threads(requested: int = 0) -> tuple[int, str]:
    """(CPU threads for torch, why): --threads when given, else OMP_NUM_THREADS when set, else
    the cores this process may use less those other work keeps busy right now. On a shared
    machine torch's default (every core) collapses: a 2-core VM with another job running
    trained 3-10x slower at 2 threads than at 1 (docs/lab-notes.md)."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores()
    threads = max(1, min(cores, round(cores - busy)))
    return threads, f"{cores} cores, {busy:.1f} busy" + (" with other work" if threads < cores else "")


DIST_TIMEOUT_S = 600.0  # torch's own default is 30 min (NCCL 10): long for a survivor to sit waiting


def setup_runtime(device: str = "auto", dtype: str = "auto", threads: int = 0,
                  dist_timeout: float = DIST_TIMEOUT_S) -> Runtime:
    """Device, precision, CPU threads and (under torchrun) the process group: NCCL on CUDA,
    gloo on CPU. A collective that waits longer than dist_timeout seconds for another process
    (a node that died without closing its sockets, or hangs) fails with an error instead of
    waiting for ever, so the survivors exit and torchrun can restart or stop the run."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    device = pick_device(device)
    threads_note = ""
    if ddp:
        import torch.distributed as dist
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                    timeout=datetime.timedelta(seconds=dist_timeout))
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if dtype == "auto":
        # bf16 on GPUs; on a CPU float32 until the model exists: then resolve_cpu_dtype times
        # both on its shapes (bf16 helps wide models on CPUs with bf16 instructions only)
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype = {dtype!r}: choose auto, float32, bfloat16 or float16", "dtype")
    ptdtype = getattr(torch, dtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "cpu":
        keep_freed_memory()
        n, why = pick_threads(threads)
        torch.set_num_threads(n)
        threads_note = f"{n} CPU thread{'s' if n > 1 else ''} ({why}; --threads=N to choose)"
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    return Runtime(device, device_type, dtype, ptdtype, autocast, scaler, ddp, rank, local_rank, world_size,
                   threads_note)


# ----------------------------------------------------------------------------- measured once per machine

def cache_path(name: str) -> str:
    """A small JSON of measurements kept between runs: $DANLU_CACHE_DIR, else ~/.cache/danlu."""
    folder = os.environ.get("DANLU_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "danlu")
    return os.path.join(folder, name)


def read_cache(name: str) -> dict:
    try:
        with open(cache_path(name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def write_cache(name: str, key: str, value) -> None:
    """Add key to the cache file; a folder that cannot be written only costs a re-measurement."""
    entries = read_cache(name)
    entries[key] = value
    try:
        os.makedirs(os.path.dirname(cache_path(name)), exist_ok=True)
        with atomic_write(cache_path(name), "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1)
    except OSError:
        pass


def machine_key(device: str) -> str:
    """What a measurement depends on besides the model: the processor, threads and torch."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_info()[0]
        device = f"{device}, {torch.get_num_threads()} threads"
    return f"{name} ({device}), torch {torch.__version__}"


def cpu_info() -> tuple[str, bool]:
    """(the CPU's model name, whether it has bf16 instructions: AVX512-BF16 or AMX-BF16)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: no flags to read, so no bf16 decision either
        pass
    return name or platform.processor() or platform.machine(), bool(flags & {"avx512_bf16", "amx_bf16"})


_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: str, dtype: str) -> float:
    """FLOP/s that MFU is measured against: the datasheet's dense bf16/fp16 figure for known
    GPUs, otherwise a matmul in the dtype training uses, timed on this machine once and kept in
    the cache (peak_flops.json) so later starts skip the timing. The trainer raises it to any
    higher rate the model itself reaches, so MFU never reads above 100%."""
    if device.startswith("cuda") and dtype != "float32":
        name = torch.cuda.get_device_name(device)
        for key, peak in _PEAKS.items():
            if key in name:
                return peak
    key = f"{machine_key(device)}, {dtype}"
    peak = read_cache("peak_flops.json").get(key)
    if peak is None:
        peak = measure_matmul_flops(device, getattr(torch, dtype))
        write_cache("peak_flops.json", key, peak)
    return peak


# Narrower models train no faster under CPU bf16 autocast: the casts cost what the bf16 matmuls
# save (docs/lab-notes.md, "bf16 on a CPU": 128 wide a wash or 3x slower, 384 wide about 2x).
BF16_MIN_WIDTH = 256
BF16_MIN_SPEEDUP = 1.1  # below this the gain is within the noise, not worth bf16's rounding
PROBE_TOKENS = 2048  # a probe step runs at most this many tokens: seconds, not minutes, on wide models


def probe_step_seconds(model, rows: int, seq_len: int, autocast, steps: int = 2) -> float:
    """Best time of `steps` forward + backward passes (after one warm-up) on random tokens from
    a private generator, dropout off: the global RNG, the weights and the gradients are as
    before, so a run that probed draws what one that read the cache does."""
    g = torch.Generator().manual_seed(0)
    device = model.lm_head.weight.device
    x = torch.randint(0, model.config.vocab_size, (rows, seq_len), generator=g).to(device)
    was_training = model.training
    model.eval()
    best = float("inf")
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, x)[1]
        loss.backward()
        if i:
            best = min(best, time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return best


def resolve_cpu_dtype(run: Runtime, model, batch_size: int, seq_len: int, requested: str,
                      previous: str | None = None) -> Runtime:
    """The run's dtype, said in one line. dtype = auto on a CPU: bf16 autocast where it trains
    this model faster, else float32. A resumed run keeps the dtype it started with (previous).
    CPUs without bf16 instructions and models narrower than BF16_MIN_WIDTH keep float32 without
    measuring; otherwise a few forward + backward steps of the model's own shapes are timed
    each way (at most PROBE_TOKENS tokens a step, announced first) and the choice is kept per
    (machine, model shape, batch) in cpu_dtype.json. run is updated in place, so every holder
    of it (the evaluation hooks) computes in the chosen dtype; under DDP bf16 only if every
    rank chose it."""
    if run.device_type != "cpu" or requested != "auto":
        print0(f"dtype {run.dtype}" + (" (--dtype)" if requested != "auto" else f" (auto on {run.device_type})"))
        return run
    cfg = model.config
    cpu, has_bf16 = cpu_info()
    if previous in ("float32", "bfloat16"):
        choice, why = previous, "kept from the checkpoint this run resumes"
    elif not has_bf16:
        choice, why = "float32", f"the CPU ({cpu}) has no bf16 instructions"
    elif cfg.n_embd < BF16_MIN_WIDTH:
        choice, why = "float32", f"n_embd {cfg.n_embd} < {BF16_MIN_WIDTH}: bf16 casts cost what they save"
    else:
        rows = max(1, min(batch_size, PROBE_TOKENS // seq_len))
        shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp", "mlp_hidden",
                                              "vocab_size", "n_expert", "moe_top_k")}
        key = f"{machine_key('cpu')}, {json.dumps(shape, sort_keys=True)}, batch {rows} x {seq_len}"
        seconds = read_cache("cpu_dtype.json").get(key)
        if seconds is None:
            print0(f"dtype auto: timing a {rows} x {seq_len} step in float32 and in bf16 on this model, once "
                   f"(kept in {cache_path('cpu_dtype.json')}; --dtype=float32 skips it)")
            bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
            seconds = {"float32": probe_step_seconds(model, rows, seq_len, nullcontext()),
                       "bfloat16": probe_step_seconds(model, rows, seq_len, bf16)}
            write_cache("cpu_dtype.json", key, seconds)
        speedup = seconds["float32"] / seconds["bfloat16"]
        choice = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
        why = (f"a {rows} x {seq_len} step: float32 {1e3 * seconds['float32']:.0f} ms, bf16 autocast "
               f"{1e3 * seconds['bfloat16']:.0f} ms ({speedup:.2f}x; bf16 from {BF16_MIN_SPEEDUP}x)")
    if run.ddp:
        votes = all_reduce_sum(torch.tensor([float(choice == "bfloat16")]), run)
        choice = "bfloat16" if votes.item() == run.world_size else "float32"
    print0(f"dtype {choice} (auto on this CPU: {why})")
    run.dtype, run.ptdtype = choice, getattr(torch, choice)
    run.autocast = nullcontext() if choice == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)
    return run


def sync_device(device: str) -> None:
    """Wait for the device's queued work, so a timer that stops now counts it (CUDA runs
    asynchronously; other devices here return when the work is done)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: str, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of an n x n matmul, best of repeated timed runs. Its inputs come from a
    private generator: drawing from the global one would shift every random number a resumed
    run draws after it (dropout), and resume must equal an uninterrupted run."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    t0 = time.perf_counter()
    a @ b
    sync_device(device)
    best = time.perf_counter() - t0  # a slow dtype (float16 on most CPUs) stops at this one
    deadline = time.time() + seconds
    while time.time() < deadline and best < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync_device(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so a many-process run prints each line once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- many processes

def all_reduce_sum(t: torch.Tensor, run: Runtime) -> torch.Tensor:
    """t summed over every process, in place (t itself without DDP)."""
    if run.ddp:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- logging and signals

def json_line(record: dict) -> str:
    """One log.jsonl line; a non-finite number is written as null (NaN is not JSON)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False, ensure_ascii=False) + "\n"


class Logger:
    """log.jsonl, loss.png, the progress bar and wandb; all of it on rank 0 only."""

    def __init__(self, cfg, run: Runtime, start_iter: int, total_iters: int):
        self.enabled = run.master
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        self.records = []
        self.bar = None
        self.wandb = None
        if not self.enabled:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        if start_iter == 0 and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log
        elif os.path.exists(self.path):  # resuming: keep what the earlier part logged
            with open(self.path) as f:
                # the resumed run evaluates start_iter again: drop the old copy of that eval
                self.records = [r for r in map(json.loads, f)
                                if r["iter"] < start_iter or (r["iter"] == start_iter and "lr" in r)]
            with atomic_write(self.path, "w", encoding="utf-8") as f:
                f.writelines(map(json_line, self.records))
        from tqdm import tqdm
        self.bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), desc="train")
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb_log = True needs the wandb package: pip install wandb "
                                  "(WANDB_MODE=offline works without a network)", "wandb_log") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                    config=config_dict(cfg), resume="allow")

    def log(self, record: dict, printed: str | None = None) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(record))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["iter"])
        if printed:
            if self.bar.disable:
                print(printed, flush=True)
            else:
                self.bar.write(printed)

    def plot(self, out_dir: str) -> None:
        """loss.png: train and val loss, the learning rate on a second axis, val accuracy for
        classifiers. Written atomically, like every file danlu writes."""
        if not self.enabled:
            return
        plot_log(self.records, os.path.join(out_dir, "loss.png"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_log(records: list[dict], path: str, title: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("loss.png needs matplotlib: pip install -r requirements.txt") from None

    def series(key, need="lr"):
        return [(r["iter"], r[key]) for r in records if r.get(key) is not None and need in r]
    acc = series("val_acc", "val_acc")
    fig, axes = plt.subplots(2 if acc else 1, 1, figsize=(7, 6 if acc else 4), squeeze=False, sharex=True)
    ax = axes[0, 0]
    for pts, label in ((series("train_loss"), "train loss (step)"), (series("val_loss", "val_loss"), "val loss")):
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if series("lr"):
        right = ax.twinx()
        right.plot(*zip(*series("lr")), ":", color="gray", label="learning rate")
        right.set_ylabel("learning rate")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    if title:
        ax.set_title(title)
    if acc:
        axes[1, 0].plot(*zip(*acc), color="green", marker=".")
        axes[1, 0].set_ylabel("val accuracy")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


class StopSignal:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (a second Ctrl-C
    stops at once); restore() puts the previous handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.raised = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.raised is not None:
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name
        print0(f"\n{self.raised}: stopping after this step, then saving ckpt.pt (again to stop at once, "
               "losing this step)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
