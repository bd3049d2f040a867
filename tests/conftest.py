"""Shared test set-up: the repo root on sys.path, the offline tiktoken cache, CPU float32."""
import json
import os
import signal
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
sys.path.insert(0, ROOT)

if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(SHARED, "tiktoken")):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken")

# One thread per process: the suite is many tiny ops, where a second OpenMP thread only helps on
# an idle machine; on a busy one each op can wait a whole scheduler slice for it (seen: 100x).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses tests start
# So pytest.ini runs one pytest-xdist worker per core (2x on 2 cores), a whole file on one worker
# (--dist loadfile): a module's fixtures (a model trained once for its tests) are built once, and
# a test that reads what the one before it left (the browser's page) finds it.
# Measurements kept between runs (matmul peak, CPU dtype choice) go to a folder of this session,
# never ~/.cache/danlu: a test neither reads a real run's choices nor leaves its own behind.
os.environ["DANLU_CACHE_DIR"] = tempfile.mkdtemp(prefix="danlu-test-cache-")
# A suite started in the background by a shell without job control (`(pytest &)`) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests would send a signal
# nobody hears. Ctrl-C is what they test, so the suite hears it again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


FIRST = ("test_sharded_checkpoint.py", "test_fsdp.py", "test_ddp.py")  # torchrun launches: the longest files


def pytest_collection_modifyitems(items):
    """The longest files first, so that no worker starts one while the others have nothing left."""
    items.sort(key=lambda item: os.path.basename(str(item.fspath)) not in FIRST)  # stable: a file keeps its order


def write_char_dataset(folder: str, text: str, n_val: int):
    """A char-level dataset in folder: train.bin (text but its last n_val characters), val.bin
    (those) and meta.json. Returns the tokenizer."""
    from data import BinWriter
    from tokenizer import CharTokenizer, save_meta
    tok = CharTokenizer.from_text(text)
    for split, part in (("train", text[:-n_val]), ("val", text[-n_val:])):
        w = BinWriter(os.path.join(folder, f"{split}.bin"), tok.vocab_size)
        w.write(tok.encode(part))
        w.close()
    save_meta(folder, tok.to_meta())
    return tok


def run_script(script: str, *args: str, check: bool = True, timeout: float = 300):
    """python <repo>/<script> args... in a new process, in the current folder, as a user runs
    it; with check, a non-zero exit fails the test with the script's stderr."""
    import subprocess
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{script} {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def shared_path(*parts) -> str:
    """A file under ../shared, or skip the test when it is not there."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture
def gpt2_available():
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network
        pytest.skip(f"tiktoken gpt2 encoding unavailable: {e}")


# ----------------------------------------------------------------------------- a tiny char run

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 40

TINY = ["--dataset=tiny", "--device=cpu", "--block_size=32", "--batch_size=4", "--n_layer=2",
        "--n_head=2", "--n_embd=32", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3", "--min_lr=3e-4"]


def make_char_dataset(root, name="tiny", text=TEXT):
    """data/<name> under root, split 90/10."""
    return write_char_dataset(os.path.join(root, "data", name), text, len(text) - int(0.9 * len(text)))


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_char_dataset(tmp_path)
    return tmp_path


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return [(r["iter"], r["train_loss"]) for r in read_log(out_dir) if "lr" in r]


@pytest.fixture(scope="session")
def fsdp_reference(tmp_path_factory) -> str:
    """The out_dir (absolute) of one 2-process FSDP run of tests/test_fsdp.py's 6 steps on its
    example dataset. Four tests compare against this same run (resume, processes, nodes, the
    sharded checkpoint's consolidation); a torchrun launch costs ~14 s on 2 cores, so it runs once
    (once per pytest-xdist worker that runs those two files)."""
    from test_ddp import make_example_dataset
    from test_fsdp import FSDP, run
    root = tmp_path_factory.mktemp("fsdp_reference")
    make_example_dataset(root)
    out_dir = str(root / "weight" / "fsdp")
    here = os.getcwd()
    os.chdir(root)  # the dataset is found under ./data, as a user's is
    try:
        r = run(*FSDP, "--parallel=fsdp", f"--out_dir={out_dir}")
    finally:
        os.chdir(here)
    assert r.returncode == 0, r.stderr[-3000:]
    return out_dir
