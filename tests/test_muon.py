"""Muon + AdamW: parameter grouping, the float32 CPU orthogonalization, a step, exact resume."""
import json
import os

import pytest
import torch

import muon
import train
from conftest import run_script, write_char_dataset
from model import GPT, GPTConfig

NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch.optim.Muon's defaults



def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "pos_emb": "rope", "norm": "rmsnorm",
                                     "qk_norm": True, "mlp": "swiglu", "bias": False}])
def test_every_parameter_in_exactly_one_optimizer(kw):
    model = tiny(**kw)
    cfg = train.TrainConfig(optimizer="muon")
    muon_opt, adamw = train.make_optimizers(cfg, model)
    assert isinstance(muon_opt, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = [p for g in muon_opt.param_groups for p in g["params"]]
    in_adamw = [p for g in adamw.param_groups for p in g["params"]]
    ids = [id(p) for p in in_muon + in_adamw]
    assert len(ids) == len(set(ids))  # no parameter twice
    assert set(ids) == {id(p) for p in model.parameters()}  # and none left out
    block_matrices = {id(p) for n, p in model.named_parameters()
                      if n.startswith("transformer.h.") and p.dim() == 2}
    assert {id(p) for p in in_muon} == block_matrices
    names = {id(p): n for n, p in model.named_parameters()}
    adamw_names = {names[id(p)] for p in in_adamw}
    assert "lm_head.weight" in adamw_names or "transformer.wte.weight" in adamw_names
    assert all(p.dim() == 2 for p in in_muon)
    assert all(p.dim() == 1 for p in adamw.param_groups[1]["params"])
    assert adamw.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("shape", [(96, 32), (32, 128), (48, 48)])
def test_float32_and_bfloat16_orthogonalization_agree(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    ref = muon._ORIGINAL_NS(g, *NS)  # the library's bfloat16 iteration
    out = muon.newtonschulz_float32(g, *NS)
    assert ref.dtype == torch.bfloat16 and out.dtype == torch.float32 and out.shape == g.shape
    rel = (out - ref.float()).norm() / out.norm()
    assert rel < 0.03, rel  # bfloat16 keeps ~3 significant digits; 5 steps compound it
    s = torch.linalg.svdvals(out)  # Muon's iteration lands singular values in ~(0.5, 1.5)
    assert s.min() > 0.5 and s.max() < 1.5


def test_installed_iteration_is_float32_on_cpu_and_the_library_elsewhere():
    muon.install_float32_newtonschulz()
    ns = torch.optim._muon._zeropower_via_newtonschulz
    assert ns(torch.randn(8, 4), *NS).dtype == torch.float32
    # any other device gets the library's own (bfloat16) iteration; "meta" stands in for a GPU
    assert ns(torch.randn(8, 4, device="meta"), *NS).dtype == torch.bfloat16


def test_missing_private_symbol_fails_clearly(monkeypatch):
    monkeypatch.setattr(muon, "_ORIGINAL_NS", None)
    with pytest.raises(RuntimeError, match="adamw"):
        muon.install_float32_newtonschulz()


def test_one_muon_step_reduces_loss():
    model = tiny()
    cfg = train.TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=3e-3)
    opts = train.make_optimizers(cfg, model)
    x = torch.randint(0, 40, (8, 16))
    y = torch.randint(0, 40, (8, 16))
    before = model(x, y)[1]
    before.backward()
    for opt in opts:
        opt.step()
    after = model(x, y)[1]
    assert after.item() < before.item()


@pytest.fixture
def char_dataset(tmp_path):
    text = "".join(f"the {w} and the {w} of it, said {w}.\n" for w in
                   ["king", "queen", "fool", "lord", "lady", "knave"] * 60)
    folder = str(tmp_path / "chars")
    write_char_dataset(folder, text, n_val=600)
    return folder


def _losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["train_loss"] for r in map(json.loads, f) if "lr" in r}


def test_muon_checkpoint_resume_continues_the_same_curve(char_dataset, tmp_path):
    """Muon + AdamW with dropout: 4 iterations, then a resume to 8 in a new process, equals 8
    uninterrupted iterations bit for bit (Muon's momentum travels in ckpt.pt)."""
    common = [f"--dataset={char_dataset}", "--optimizer=muon", "--device=cpu", "--n_layer=2",
              "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--log_interval=1",
              "--eval_interval=100", "--eval_iters=2", "--warmup_iters=2", "--lr_decay_iters=8",
              "--dropout=0.1"]
    whole, half = str(tmp_path / "whole"), str(tmp_path / "half")
    run_script("train.py", *common, f"--out_dir={whole}", "--max_iters=8")
    run_script("train.py", *common, f"--out_dir={half}", "--max_iters=4")
    ckpt = torch.load(os.path.join(half, "ckpt.pt"), weights_only=True)
    muon_state = ckpt["optimizer"][0]["state"]
    assert muon_state and all("momentum_buffer" in s for s in muon_state.values())
    run_script("train.py", *common, f"--out_dir={half}", "--max_iters=8", "--init_from=resume")
    a, b = _losses(whole), _losses(half)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b
