"""
What every entry point shares: config loading, the device / dtype / DDP runtime, checkpoint
save and load, and rank-0 printing.

Config: defaults are a dataclass; `config/<name>.py` is run in a namespace holding those
defaults (so it may compute values), then `--key=value` overrides apply. Unknown keys and values
of the wrong type are errors that name the key, the file, and the closest valid key.
"""
import ast
import ctypes
import dataclasses
import difflib
import json
import os
import signal
import sys
import typing
from contextlib import nullcontext

import torch

from model import ConfigError  # noqa: F401  (defined beside the config fields it checks)

CKPT_VERSION = 1


# ----------------------------------------------------------------------------- config

_ACCEPTS = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _check_type(cls, key, value, where):
    """Config fields are int, float, bool or str; an int is accepted for a float."""
    hint = typing.get_type_hints(cls)[key]
    ok = isinstance(value, _ACCEPTS[hint]) and (hint is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} is a {type(value).__name__}, but {key} "
                          f"takes a {hint.__name__} (default: {getattr(cls(), key)!r})")
    return float(value) if hint is float else value


def _unknown(cls, key, where):
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def parse_cli_value(text: str):
    """--key=value: a Python literal when it parses as one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(cls, argv: list[str]):
    """Build a `cls` dataclass from [config_file.py] [--key=value ...]."""
    values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist (configs live in config/)")
        namespace = dict(values)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, path, "exec"), {}, namespace)
        for key, value in namespace.items():
            if key.startswith("_") or isinstance(value, type(sys)) or callable(value):
                continue  # imports, helpers and private names in a config are not keys
            if key not in values:
                raise _unknown(cls, key, path)
            values[key] = _check_type(cls, key, value, path)
    hints = typing.get_type_hints(cls)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"command line: {arg!r} is not of the form --key=value")
        key, _, text = arg[2:].partition("=")
        if key not in values:
            raise _unknown(cls, key, "command line")
        if "=" not in arg:  # --flag for a bool, --key value for the rest
            if hints[key] is bool:
                text = "True"
            elif args and not args[0].startswith("--"):
                text = args.pop(0)
            else:
                raise ConfigError(f"command line: --{key} needs a value (--{key}=...)")
        value = parse_cli_value(text)
        if hints[key] is str:
            value = text  # a string key takes the text as written (e.g. --out_dir=123)
        values[key] = _check_type(cls, key, value, "command line")
    return cls(**values)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def subset(cls, cfg):
    """The fields of dataclass `cls` (e.g. GPTConfig) taken from a larger config."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


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

    @property
    def master(self) -> bool:
        return self.rank == 0


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse instead of handing them back to the
    kernel. A CPU training step frees and reallocates the same large buffers: the logits alone
    are B*T*vocab floats, 400 MB for a GPT-2 vocabulary at batch 8 x 256. By default glibc maps
    each such block afresh and unmaps it on free, so every step pays page faults and zeroing in
    the kernel: measured 2x slower on the GPT-2-BPE base of config/pretrain_gpt2_small_cpu.py
    (1,627 vs 795 ms/iter). One arena keeps every thread on the same reusable heap. The cost:
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


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Device, precision and (under torchrun) the process group: NCCL on CUDA, gloo on CPU."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    device = pick_device(device)
    if ddp:
        import torch.distributed as dist
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if dtype == "auto":
        # bf16 is fast on GPUs; on CPUs without AMX it runs matmuls ~300x slower than float32
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype = {dtype!r}: choose float32, bfloat16 or float16")
    ptdtype = getattr(torch, dtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "cpu":
        keep_freed_memory()
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    return Runtime(device, device_type, dtype, ptdtype, autocast, scaler, ddp, rank, local_rank, world_size)


_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: str, dtype: str) -> float:
    """FLOP/s that MFU is measured against: the datasheet's dense bf16 figure for known GPUs,
    otherwise a float32 matmul timed on this device (cached per process)."""
    if device.startswith("cuda") and dtype != "float32":
        name = torch.cuda.get_device_name(device)
        for key, peak in _PEAKS.items():
            if key in name:
                return peak
    if (device, dtype) not in _measured:
        _measured[(device, dtype)] = measure_matmul_flops(device, torch.float32)
    return _measured[(device, dtype)]


_measured: dict = {}


def sync_device(device: str) -> None:
    """Wait for the device's queued work, so a timer that stops now counts it (CUDA runs
    asynchronously; other devices here return when the work is done)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: str, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of an n x n matmul, best of repeated timed runs."""
    import time
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync_device(device)
    best, deadline = float("inf"), time.time() + seconds
    while time.time() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync_device(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def cli(main) -> None:
    """Run an entry point's main(); a user error (bad config, data or checkpoint) prints one
    clear line and exits 1 instead of a traceback. DANLU_DEBUG=1 shows the traceback."""
    try:
        main()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # under torchrun: leave the group cleanly
    except (ConfigError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("DANLU_DEBUG"):
            raise
        print(f"error: {e}\n(set DANLU_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so a many-process run prints each line once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str, ckpt: dict) -> None:
    """Write atomically: temp file in the same folder, fsync, rename. A crash at any moment
    leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": CKPT_VERSION, **ckpt}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # disk full, quota, permissions: say what survived
            raise CheckpointError(f"could not write {path} ({e}); the previous checkpoint there is "
                                  "untouched. Free disk space (or fix the folder) and resume.") from e
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True, turning every failure into a message a user can act on."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py config/...)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    return ckpt


def load_model(path: str, device: str = "cpu"):
    """(model in eval mode, checkpoint dict) from a run folder or ckpt.pt."""
    from model import GPT, GPTConfig
    ckpt = load_checkpoint(path)
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known}))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- many processes

def gather(obj, run: Runtime) -> list:
    """obj from every rank, in rank order (a one-element list without DDP)."""
    if not run.ddp:
        return [obj]
    import torch.distributed as dist
    out = [None] * run.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, run: Runtime) -> bool:
    """True on every rank if it is true on any: ranks must agree on when to skip or stop."""
    if not run.ddp:
        return flag
    import torch.distributed as dist
    t = torch.tensor([float(flag)], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- logging and signals

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
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        from tqdm import tqdm
        self.bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), desc="train")
        if cfg.wandb_log:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                    config=config_dict(cfg), resume="allow")

    def log(self, record: dict, printed: str | None = None) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["iter"])
        if printed:
            if self.bar.disable:
                print(printed, flush=True)
            else:
                self.bar.write(printed)

    def plot(self, out_dir: str) -> None:
        if not self.enabled:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [(r["iter"], r["train_loss"]) for r in self.records if "lr" in r]
        evals = [(r["iter"], r["val_loss"]) for r in self.records if "val_loss" in r]
        for pts, label in ((steps, "train loss (step)"), (evals, "val loss")):
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


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

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
