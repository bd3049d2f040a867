"""Mixture of experts: shapes and routing, dropless (every token through exactly its top_k
experts), the load-balancing loss on a hand-computed case, n_expert=1 equals the dense MLP,
KV-cache generation equals full recomputation; training: the aux loss is logged and does not
change with micro-batching, resume in a new process is exact, 2 gloo processes run, sample.py
loads the checkpoint, export to Hugging Face is a clear error."""
import dataclasses

import numpy as np
import pytest
import torch

from engine import generate
import train
from checkpoint import load_checkpoint
from settings import ConfigError
from conftest import run_script
from convert import ConvertError
from model import GPT, GPTConfig, MoE
from test_exact import ANSWERS, make_answer_dataset
from conftest import TINY, make_char_dataset, read_log, step_losses

MOE = ["--n_expert=4", "--moe_top_k=2", "--mlp_hidden=64"]


def moe_config(**kw) -> GPTConfig:
    base = dict(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32, n_expert=4, moe_top_k=2,
                mlp_hidden=48)
    return GPTConfig(**{**base, **kw})


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_every_token_goes_through_exactly_its_top_k_experts(router):
    """The dispatch by sorting equals a plain loop over tokens: y_t = sum over its k chosen
    experts of gate * expert(x_t) (+ the shared expert), nothing dropped however unbalanced."""
    torch.manual_seed(0)
    cfg = moe_config(moe_router=router, moe_shared_expert=True)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # skew: most tokens want expert 0 (no capacity limit drops any)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        y = moe(x)
        gates, chosen, probs = moe.route(x.reshape(-1, 32))
        want = torch.stack([sum(g * moe.experts[e](t[None])[0] for g, e in zip(gs, es)) + moe.shared(t[None])[0]
                            for t, gs, es in zip(x.reshape(-1, 32), gates, chosen.tolist())])
    assert y.shape == (3, 7, 32) and moe.chosen.shape == (3, 7, 2) and moe.probs.shape == (3, 7, 4)
    assert torch.allclose(y.reshape(-1, 32), want, atol=1e-6)
    assert all(len(set(es)) == 2 for es in chosen.tolist())
    assert torch.allclose(probs.sum(-1), torch.ones(21))
    if router == "sigmoid":  # normalised over the chosen
        assert torch.allclose(gates.sum(-1), torch.ones(21))
    else:  # the top-k softmax probabilities themselves
        assert torch.equal(gates, probs.topk(2, dim=-1).values)


def test_balance_loss_on_a_hand_computed_case():
    """One layer, 2 experts, top-1, one row of 4 tokens: tokens pick experts 0, 0, 0, 1 with
    probabilities for expert 0 of .9 .8 .6 .3. f = (3/4, 1/4), P = (.65, .35):
    aux = 2 * (.75 * .65 + .25 * .35) = 1.15; "sum" weighs the row by its 4 counted tokens.
    Masking token 3 out: f = (2/3, 1/3), P = (2/3, 1/3), aux = 10/9, sum 3 * 10/9."""
    model = GPT(moe_config(n_layer=1, n_expert=2, moe_top_k=1))
    moe = model.transformer.h[0].mlp
    p0 = torch.tensor([0.9, 0.8, 0.6, 0.3])
    moe.probs = torch.stack([p0, 1 - p0], -1)[None]  # (1, 4, 2)
    moe.chosen = torch.tensor([[[0], [0], [0], [1]]])  # (1, 4, 1)
    ones = torch.ones(1, 4)
    assert train.balance_loss(model, ones, "mean").item() == pytest.approx(1.15)
    assert train.balance_loss(model, ones, "sum").item() == pytest.approx(4 * 1.15)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    assert train.balance_loss(model, mask, "sum").item() == pytest.approx(3 * 10 / 9)
    # two rows are two sequences: each balanced on its own, weighted by its count
    moe.probs = torch.cat([moe.probs, torch.full((1, 4, 2), 0.5)])
    moe.chosen = torch.cat([moe.chosen, torch.tensor([[[0], [1], [0], [1]]])])
    assert train.balance_loss(model, torch.ones(2, 4), "sum").item() == pytest.approx(4 * 1.15 + 4 * 1.0)


def test_forward_leaves_the_aux_loss_and_the_loss_is_cross_entropy_alone():
    torch.manual_seed(0)
    model = GPT(moe_config())
    x, y = torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16))
    logits, loss = model(x, y)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.view(-1, 40), y.view(-1)))
    total, aux = train.Objective(model, loss_only=False)(x, y)  # the training loop's sums
    assert 1.0 <= aux.item() / 32 <= 4.0
    assert aux.item() == pytest.approx(32 * train.balance_loss(model, torch.ones(2, 16), "mean").item())
    assert total.item() == pytest.approx(32 * loss.item(), rel=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_one_expert_top_1_equals_the_dense_mlp(router):
    torch.manual_seed(0)
    dense = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32)).eval()
    moe = GPT(dataclasses.replace(dense.config, n_expert=1, moe_top_k=1, moe_router=router)).eval()
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("router.weight") for k in missing)
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.allclose(dense(x)[0], moe(x)[0], atol=1e-6)


def test_kv_cache_generation_equals_full_recomputation():
    torch.manual_seed(0)
    model = GPT(moe_config(moe_shared_expert=True, pos_emb="rope", norm="rmsnorm", mlp="swiglu")).eval()
    x = torch.randint(0, 40, (2, 5))
    a = generate(model, x, 12, temperature=0.0, use_cache=True)  # fills block_size 16
    b = generate(model, x, 12, temperature=0.0, use_cache=False)
    assert a.tolist() == b.tolist()
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    a = generate(model, x, 10, temperature=1.0, use_cache=True, generator=g1)
    b = generate(model, x, 10, temperature=1.0, use_cache=False, generator=g2)
    assert a.tolist() == b.tolist()


def test_moe_config_errors():
    with pytest.raises(ConfigError, match="moe_top_k = 3 is more than n_expert = 2"):
        GPTConfig(n_expert=2, moe_top_k=3)
    with pytest.raises(ConfigError, match="moe_router = 'relu'.*softmax, sigmoid"):
        GPTConfig(n_expert=2, moe_router="relu")


def test_flops_count_only_the_active_experts():
    dense = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48))
    moe = GPT(moe_config(moe_top_k=1))  # 4 experts of width 48, one active: the dense MLP's work
    router = 2 * 32 * 4
    assert moe.flops_per_token() == pytest.approx(dense.flops_per_token() + 6 * router)


# ----------------------------------------------------------------------------- training

def test_aux_loss_is_logged_and_micro_batching_does_not_change_it(tmp_path, monkeypatch):
    """The balancing loss is per sequence over the counted positions, weighted by their count
    and divided by the step's targets like the cross-entropy: batch 8 x 1 == 4 x 2."""
    monkeypatch.chdir(tmp_path)
    make_answer_dataset(tmp_path)
    for (batch, accum), name in {(8, 1): "a", (4, 2): "b"}.items():
        train.main(ANSWERS + MOE + ["--moe_aux_weight=0.1", f"--batch_size={batch}",
                                    f"--gradient_accumulation_steps={accum}", f"--out_dir=weight/{name}"])
    logs = [[r for r in read_log(f"weight/{n}") if "lr" in r] for n in "ab"]
    for key in ("train_loss", "aux_loss"):
        a, b = ([r[key] for r in log] for log in logs)
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (key, a, b)
    assert all(1.0 <= r["aux_loss"] <= 4.0 for r in logs[0])
    # 8 x 1 and 4 x 2 add the same terms in another order: float32 gradients differ by ~1e-7
    # relative, and AdamW divides by sqrt(v), so where v is tiny such a difference moves a weight
    # by up to ~lr * 1e-3 per step. 3 steps at lr 1e-3 bound that by ~1e-5 on any CPU (an Intel
    # Xeon with AMX measured 3.3e-6; an AMD EPYC under 1e-6).
    wa, wb = (load_checkpoint(f"weight/{n}")["model"] for n in "ab")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)


def test_moe_resume_in_a_new_process_and_sampling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_char_dataset(tmp_path)
    args = TINY + MOE + ["--moe_shared_expert=True", "--dropout=0.1", "--eval_interval=5", "--lr_decay_iters=10"]
    run_script("train.py", *args, "--max_iters=10", "--out_dir=weight/full")
    run_script("train.py", *args, "--max_iters=5", "--out_dir=weight/split")
    run_script("train.py", *args, "--max_iters=10", "--out_dir=weight/split", "--init_from=resume")
    assert step_losses("weight/split") == step_losses("weight/full")
    a, b = (load_checkpoint(f"weight/{d}")["model"] for d in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = run_script("sample.py", "--out_dir=weight/full", "--start=First", "--max_new_tokens=20", "--temperature=0")
    assert "First" in r.stdout
    r = run_script("export.py", "--out_dir=weight/full", "--format=hf", "--dest=hf_moe", check=False)
    assert r.returncode != 0 and "n_expert = 4" in r.stderr and "no Hugging Face class" in r.stderr


def test_moe_on_two_gloo_processes(tmp_path, monkeypatch):
    """One step of 2 processes x 1 micro-batch == 1 process x 2: every expert runs (also on no
    tokens), so DDP finds a gradient for each parameter."""
    from test_ddp import ARGS, make_example_dataset, torchrun
    monkeypatch.chdir(tmp_path)
    make_example_dataset(tmp_path)
    args = ARGS + MOE + ["--max_iters=1", "--eval_interval=1"]
    train.main(args + ["--out_dir=weight/single"])
    r = torchrun(*args, "--out_dir=weight/ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_checkpoint(f"weight/{d}") for d in ("single", "ddp"))
    assert b["world_size"] == 2
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])


def test_export_refuses_moe_for_hf(tmp_path):
    import export
    torch.manual_seed(0)
    model = GPT(moe_config())
    from checkpoint import save_checkpoint
    from tokenizer import CharTokenizer
    save_checkpoint(str(tmp_path / "run" / "ckpt.pt"), {
        "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
        "tokenizer": CharTokenizer(list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?")).to_meta()})
    with pytest.raises(ConvertError, match="n_expert = 4 .*no Hugging Face class"):
        export.main([f"--out_dir={tmp_path / 'run'}", f"--dest={tmp_path / 'hf'}"])
