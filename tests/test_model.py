"""The model's sharp edges: shapes, init loss, causality, every switch, KV cache == recomputation."""
import math

import pytest
import torch

from engine import generate, sample_next
from model import GPT, GPTConfig
from train import Objective

V = 61
SWITCHES = {
    "gpt2": {},
    "rope": {"pos_emb": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "relu2": {"mlp": "relu2"},
    "gqa": {"n_kv_head": 2},
    "mqa_rope": {"n_kv_head": 1, "pos_emb": "rope"},
    "qk_norm": {"qk_norm": True},
    "no_bias": {"bias": False},
    "untied": {"tie_embeddings": False},
    "softcap": {"logit_softcap": 15.0},
    "math_attn": {"attn_impl": "math"},
    "modern": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True,
               "tie_embeddings": False, "bias": False, "n_kv_head": 2},
}


def tiny(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("name", SWITCHES)
def test_shapes_and_init_loss(name):
    model = tiny(**SWITCHES[name])
    x = torch.randint(0, V, (3, 20))
    y = torch.randint(0, V, (3, 20))
    logits, loss = model(x, y)
    assert logits.shape == (3, 20, V)
    # a fresh model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(V)) < 0.2


@pytest.mark.parametrize("name", SWITCHES)
def test_causality(name):
    """Changing a future token leaves the logits of every earlier position unchanged."""
    model = tiny(**SWITCHES[name]).eval()
    x = torch.randint(0, V, (2, 24))
    x2 = x.clone()
    x2[:, 15] = (x2[:, 15] + 1) % V
    a, _ = model(x)
    b, _ = model(x2)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("name", SWITCHES)
def test_each_switch_trains(name):
    model = tiny(**SWITCHES[name])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    x = torch.randint(0, V, (4, 16))
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_overfit_one_batch():
    model = tiny(n_layer=2, n_embd=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    x = torch.randint(0, V, (2, 17))
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_sdpa_matches_math_path():
    a = tiny(pos_emb="rope", n_kv_head=2).eval()
    b = tiny(pos_emb="rope", n_kv_head=2, attn_impl="math").eval()
    x = torch.randint(0, V, (2, 32))
    assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "rope", "gqa", "mqa_rope", "modern", "math_attn"])
def test_kv_cache_generation_equals_recomputation(name):
    """Greedy generation with the cache gives exactly the tokens of full recomputation while
    the text fits block_size (past it the cache shifts the context: tests/test_speed.py)."""
    model = tiny(**SWITCHES[name]).eval()
    x = torch.randint(0, V, (2, 5))
    cached = generate(model, x, 60, temperature=0.0, use_cache=True)
    full = generate(model, x, 60, temperature=0.0, use_cache=False)
    assert cached.shape == full.shape == (2, 65)
    fits = model.config.block_size + 1  # the token after a full window still sees all of it
    assert torch.equal(cached[:, :fits], full[:, :fits])


def test_kv_cache_sampling_same_seed_same_tokens():
    model = tiny(pos_emb="rope").eval()
    x = torch.randint(0, V, (1, 4))
    outs = [generate(model, x, 20, temperature=1.0, top_k=10, top_p=0.9, use_cache=c,
                           generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_stop_tokens_end_generation():
    model = tiny().eval()
    x = torch.randint(0, V, (1, 4))
    first = generate(model, x, 1, temperature=0.0)[0, -1].item()
    out = generate(model, x, 50, temperature=0.0, stop_tokens=[first])
    assert out.shape == (1, 5) and out[0, -1].item() == first


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, temperature=0.0).item() == 3
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)} == {3}
    # top_p = 0.5: token 3 holds ~64% of the mass, so it alone is kept
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(20)} == {3}
    assert len({sample_next(logits, 1.0, generator=g).item() for _ in range(200)}) == 4


def test_weighted_loss_and_ignore():
    model = tiny()
    x = torch.randint(0, V, (2, 8))
    y = torch.randint(0, V, (2, 8))
    logits, loss = model(x, y)
    y_ign = y.clone()
    y_ign[:, :4] = -1
    _, masked = model(x, y_ign)
    ce = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, V), y[:, 4:].reshape(-1))
    assert torch.allclose(masked, ce, atol=1e-6)
    w = torch.ones(2, 8)
    w[:, :4] = 0.0
    weighted, _ = Objective(model, loss_only=False)(x, y, w)  # the training loop's weighted sum
    assert torch.allclose(weighted / w.sum(), ce, atol=1e-6)


def test_loss_only_applies_the_head_where_targets_count():
    """The training loop's loss_only path (head on kept rows only) gives the same loss and the
    same gradients as the full (B, T, V) path, with -1 targets, with weights, with a softcap."""
    for kw in ({}, {"logit_softcap": 5.0, "tie_embeddings": False}):
        model = tiny(**kw)
        x, y = torch.randint(0, V, (3, 10)), torch.randint(0, V, (3, 10))
        y[0, :6], y[2, 7:] = -1, -1  # a prompt, and padding
        w = torch.rand(3, 10)
        w[1, :3] = 0.0
        for weights in (None, w):
            full, _ = Objective(model, loss_only=False)(x, y, weights)
            g_full = torch.autograd.grad(full, list(model.parameters()))
            sparse, _ = Objective(model, loss_only=True)(x, y, weights)
            g_sparse = torch.autograd.grad(sparse, list(model.parameters()))
            assert torch.allclose(sparse, full, atol=1e-6)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_sparse))


def test_tied_and_untied_and_optimizer_groups():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == V * 32
    from train import TrainConfig, make_optimizers
    (opt,) = make_optimizers(TrainConfig(weight_decay=0.1, learning_rate=1e-3), tied)
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == tied.num_params(False)
    assert tied.flops_per_token(32) > 6 * tied.num_params()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="pos_emb"):
        GPTConfig(pos_emb="alibi")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_plain_generate_is_nanogpts_loop():
    """model.generate (KV cache while the window has room, then nanoGPT's crop) gives the tokens
    of the engine's exact reference (no cache: the last block_size tokens each step), also past
    the window, greedy and through the sampling path (top_k=1: the engine draws one uniform
    number per row where nanoGPT's multinomial draws one per vocabulary entry, so only a
    certain draw can agree token for token)."""
    model = tiny(block_size=16).eval()
    x = torch.randint(0, V, (2, 5))
    assert torch.equal(model.generate(x, 30, temperature=0.0), generate(model, x, 30, temperature=0.0, use_cache=False))
    a = model.generate(x, 20, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3))
    b = generate(model, x, 20, temperature=0.7, top_k=1, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
