"""Past one machine, on CPU (gloo): FSDP2 trains the losses DDP and one process train, resumes
exactly on another number of processes, holds about 1/N of the state per process, and runs as
two "nodes" on loopback (two torchrun launchers meeting at a c10d rendezvous)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, read_log
from test_ddp import ARGS, make_example_dataset, torchrun

pytest.importorskip("torch.distributed.fsdp")
FSDP = ARGS + ["--gradient_accumulation_steps=4", "--lr_decay_iters=6", "--eval_interval=3", "--max_iters=6"]


def run(*args, nproc=2):
    """torchrun, once more if a process died of SIGSEGV: seen once in 20+ runs of this file, in a
    gloo collective on a loaded 2-core machine (not reproduced in 40 runs since; see the session
    note). Wrong numbers or any other failure still fail the test."""
    r = torchrun(*args, nproc=nproc)
    if r.returncode != 0 and "SIGSEGV" in r.stderr:
        r = torchrun(*args, nproc=nproc)
    return r


def losses(out_dir):
    return [r["train_loss"] for r in read_log(out_dir) if "lr" in r]


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_example_dataset(tmp_path)
    return tmp_path


def test_fsdp_equals_ddp_equals_one_process(data, fsdp_reference):
    import train
    train.main(FSDP + ["--out_dir=weight/one"])
    for name, extra in (("ddp", []), ("fsdp_ac", ["--parallel=fsdp", "--activation_checkpointing"])):
        r = run(*FSDP, f"--out_dir=weight/{name}", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    one = losses("weight/one")
    # the same sums in another order (shards, processes): float32 rounding, nothing more
    for name, out_dir in (("ddp", "weight/ddp"), ("fsdp", fsdp_reference), ("fsdp_ac", "weight/fsdp_ac")):
        assert np.allclose(losses(out_dir), one, rtol=1e-5, atol=1e-6), name
    held = [[r for r in read_log(d) if "state_mb" in r][-1]["state_mb"] for d in ("weight/ddp", fsdp_reference)]
    for key in ("params", "optimizer"):  # rank 0's share: about half of DDP's whole copy
        assert held[1][key] <= 0.6 * held[0][key], (key, held)


def test_fsdp_resumes_exactly_on_another_number_of_processes(data, fsdp_reference):
    r = run(*FSDP[:-1], "--max_iters=3", "--parallel=fsdp", "--out_dir=weight/split")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(*FSDP, "--parallel=fsdp", "--out_dir=weight/split", nproc=1)  # 2 -> 1 process
    assert r.returncode == 0, r.stderr[-3000:]
    # the same steps; 1 process adds its 4 micro-batches where 2 added 2 each and reduced: rounding only
    assert np.allclose(losses("weight/split"), losses(fsdp_reference), rtol=1e-6)
    r = torchrun(*FSDP, "--out_dir=weight/split")  # the optimizer state is laid out for fsdp
    assert r.returncode != 0 and "parallel = 'fsdp'" in r.stderr


def test_fsdp_needs_torchrun_and_adamw(data):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FSDP, "--parallel=fsdp",
                        "--out_dir=weight/x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "run under torchrun" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_and_resume(data, fsdp_reference):
    """torchrun --nnodes=2 started twice, as on two machines: one process per node; a second
    pair of launchers resumes what the first saved, to the losses of one 2-process run."""
    def launch(node_rank, port, max_iters):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=danlu-test", os.path.join(ROOT, "train.py"), *FSDP[:-1], f"--max_iters={max_iters}",
               "--parallel=fsdp", "--out_dir=weight/nodes"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    for max_iters in (3, 6):
        port = free_port()
        nodes = [launch(rank, port, max_iters) for rank in (0, 1)]
        outs = [p.communicate(timeout=300) for p in nodes]
        assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    assert np.allclose(losses("weight/nodes"), losses(fsdp_reference), rtol=1e-6)
