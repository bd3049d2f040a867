"""engine.BatchDecoder, continuous batching: each row's tokens are exactly what generate gives
that row alone (greedy and seeded sampling, stop tokens, a constraint, past the window), with
rows of different prompt lengths prefilled in chunks, joining mid-way, leaving, and slots reused;
and the model's per-row positions (a LongTensor pos) against its int path."""
import pytest
import torch

from engine import BatchDecoder, generate, inverse_cdf, sample_next
from model import GPT, GPTConfig

V = 41
KINDS = [{}, {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "n_kv_head": 1, "mlp": "swiglu"}]


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def prompts(n: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (L,), generator=g).tolist() for L in (1, 4, 9, 17, 31, 2, 40, 12)[:n]]


def alone(model, ids, n, seed=None, **kw) -> list[int]:
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(model, torch.tensor([ids]), n, generator=g, **kw)[0, len(ids):].tolist()


def drain(batch: BatchDecoder, out: dict, steps: int | None = None) -> None:
    while batch.busy() and steps != 0:
        for row, t in batch.step():
            out.setdefault(row.tag, []).append(t)
        steps = None if steps is None else steps - 1


@pytest.mark.parametrize("kw", KINDS)
def test_per_row_positions_match_the_int_path(kw):
    """A decode step with pos (B,) gives each row what a step at its own int pos gives it."""
    model = tiny(**kw)
    ps = prompts(4)
    caches = model.make_caches(4, 32)
    with torch.no_grad():
        for b, p in enumerate(ps[:4]):
            one = [c for c in model.make_caches(1, 32)]
            model.body(torch.tensor([p]), one, 0)
            for c, o in zip(caches, one):
                c.k[b], c.v[b] = o.k[0], o.v[0]
        nxt = torch.tensor([[3], [5], [7], [11]])
        pos = torch.tensor([len(p) for p in ps[:4]])
        batched = model.body(nxt, caches, pos)
        for b, p in enumerate(ps[:4]):
            one = model.make_caches(1, 32)
            model.body(torch.tensor([p]), one, 0)
            ref = model.body(nxt[b:b + 1], one, len(p))
            torch.testing.assert_close(batched[b:b + 1], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", KINDS)
def test_greedy_alone_and_in_a_batch_of_eight(kw):
    """8 prompts of 1 to 40 tokens (past the 32-token window: a context shift), 3 slots (rows
    wait, slots are freed and reused), prefill chunks of 8: every reply is token for token the
    one generate() gives it alone. (Exact on these CPU models; a batched matmul may round
    differently elsewhere, which could flip a near tie.)"""
    model = tiny(**kw)
    ps = prompts()
    batch, out = BatchDecoder(model, slots=3, chunk=8), {}
    for i, p in enumerate(ps):
        batch.add(p, 45, temperature=0.0, tag=i)
    drain(batch, out)
    assert [out[i] for i in range(8)] == [alone(model, p, 45, temperature=0.0) for p in ps]
    assert batch.caches[0].k.shape == (3, 1 if kw else 2, 32, 8)  # the pool: slots x kv heads x max_len x hs


@pytest.mark.parametrize("kw", KINDS)
def test_seeded_sampling_settings_and_stops_are_per_row(kw):
    """Each row keeps its own temperature, top_k, top_p, generator and stop tokens: the same
    seed gives the same reply alone and batched."""
    model = tiny(**kw)
    ps = prompts()
    settings = [dict(temperature=0.7 + 0.1 * i, top_k=[None, 5, 20][i % 3], top_p=[1.0, 0.9, 0.5][i % 3],
                     stop_tokens=(i, i + 1)) for i in range(8)]
    batch, out = BatchDecoder(model, slots=8, chunk=16), {}
    for i, (p, s) in enumerate(zip(ps, settings)):
        batch.add(p, 30, generator=torch.Generator().manual_seed(i), tag=i, **s)
    drain(batch, out)
    want = [alone(model, p, 30, seed=i, **s) for i, (p, s) in enumerate(zip(ps, settings))]
    assert [out[i] for i in range(8)] == want
    assert any(len(w) < 30 for w in want)  # some stop token was hit


@pytest.mark.parametrize("kw", KINDS)
def test_rows_with_the_same_settings_sample_together_as_alone(kw):
    """Rows sharing temperature, top_k and top_p are filtered in one pass, each drawing with its
    own generator: still the reply each seed gives alone."""
    model = tiny(**kw)
    ps = prompts()
    batch, out = BatchDecoder(model, slots=8, chunk=8), {}
    for i, p in enumerate(ps):
        batch.add(p, 40, 0.9, 10, 0.8, torch.Generator().manual_seed(50 + i), tag=i)
    drain(batch, out)
    assert [out[i] for i in range(8)] == [alone(model, p, 40, seed=50 + i, temperature=0.9, top_k=10, top_p=0.8)
                                          for i, p in enumerate(ps)]


def test_a_constraint_keeps_its_own_state_per_row():
    """A token automaton (here: after an even token only odd ones, and back) with its distance
    budget: each row's tokens are what generate gives it alone with the same constraint."""
    model = tiny()
    table = torch.full((2, V), -1, dtype=torch.int8)
    table[0, 0::2], table[1, 1::2] = 1, 0  # state 0 writes an even token -> state 1 -> odd -> 0
    ps = prompts()
    batch, out = BatchDecoder(model, slots=4, chunk=8), {}
    for i, p in enumerate(ps):
        batch.add(p, 8 + 2 * i, temperature=1.0, generator=torch.Generator().manual_seed(i), constraint=table, tag=i)
    drain(batch, out)
    for i, p in enumerate(ps):
        want = alone(model, p, 8 + 2 * i, seed=i, temperature=1.0, constraint=table)
        assert out[i] == want
        assert all((t % 2) == (j % 2) for j, t in enumerate(want))
        assert len(want) % 2 == 0  # the budget runs out in state 0


def test_rows_join_mid_way_and_a_freed_slot_is_reused():
    model = tiny(pos_emb="rope")
    ps = prompts()
    batch, out = BatchDecoder(model, slots=2, chunk=16), {}
    batch.add(ps[3], 20, temperature=0.0, tag=0)
    gone = batch.add(ps[6], 20, temperature=0.0, tag=1)
    drain(batch, out, steps=6)
    batch.remove(gone)  # the client left: its slot goes to the next row
    batch.add(ps[4], 25, temperature=0.0, tag=2)
    drain(batch, out, steps=3)
    batch.add(ps[0], 10, temperature=0.0, tag=3)
    batch.add(ps[7], 10, temperature=0.0, tag=4)
    drain(batch, out)
    assert out[0] == alone(model, ps[3], 20, temperature=0.0)
    assert out[2] == alone(model, ps[4], 25, temperature=0.0)
    assert out[3] == alone(model, ps[0], 10, temperature=0.0)
    assert out[4] == alone(model, ps[7], 10, temperature=0.0)
    assert out[1] == alone(model, ps[6], 20, temperature=0.0)[:len(out[1])] and len(out[1]) < 20
    assert not batch.busy() and batch.slots == [None, None]


def test_a_failing_row_fails_alone():
    """A prompt the model cannot read (a token id past its vocabulary) fails in its own
    prefill: that row leaves with its error in batch.failed, and every other row's reply is
    still the one it gets alone."""
    model = tiny()
    ps = prompts()
    batch, out, failed = BatchDecoder(model, slots=4, chunk=8), {}, []
    for i, p in enumerate(ps):
        batch.add(p + [V + 5] if i == 2 else p, 12, temperature=0.0, tag=i)
    while batch.busy():
        for row, t in batch.step():
            out.setdefault(row.tag, []).append(t)
        failed += batch.failed
    assert [r.tag for r in failed] == [2] and isinstance(failed[0].error, IndexError)
    assert 2 not in out
    for i, p in enumerate(ps):
        if i != 2:
            assert out[i] == alone(model, p, 12, temperature=0.0)


def test_a_row_whose_probabilities_are_not_finite_fails_alone():
    """sample_next refuses a NaN distribution; the batched draw refuses it for that row only."""
    model = tiny()
    batch = BatchDecoder(model, slots=2)
    a = batch.add([1, 2], 5, temperature=1.0, generator=torch.Generator().manual_seed(0), tag="a")
    b = batch.add([3], 5, temperature=1.0, generator=torch.Generator().manual_seed(0), tag="b")
    logits = torch.randn(2, V)
    made = batch._sample([(a, torch.full((1, V), float("nan"))), (b, logits[1:])])
    assert [r.tag for r in batch.failed] == ["a"] and "not finite" in str(a.error)
    want = int(sample_next(logits[1:], 1.0, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="not finite"):
        sample_next(torch.full((1, V), float("nan")), 1.0)
    assert made == [(b, want)]


def test_replies_in_a_batch_are_the_replies_one_at_a_time():
    """eval.py scores replies 16 at a time: each is the greedy reply generate() gives its prompt
    alone, cut at the end of the turn (some prompts end their turn early, some run out)."""
    from runtime import setup_runtime
    from engine import replies
    from tokenizer import CHAT_TOKENS, END_OF_TURN, CharTokenizer
    tok = CharTokenizer([chr(ord("a") + i) for i in range(V - len(CHAT_TOKENS))])
    tok.add_special_tokens(CHAT_TOKENS)
    model, run, end = tiny(), setup_runtime("cpu", "float32", 1), tok.token_id(END_OF_TURN)
    with torch.no_grad():  # make the end of the turn likely enough that some replies stop early
        model.lm_head.weight[end] *= 4
    ps = prompts()
    got = replies(model, tok, ps, 12, run, slots=3)
    for p, text in zip(ps, got):
        out = alone(model, p[-(32 - 12):], 12, temperature=0.0, stop_tokens=(end,))
        assert text == tok.decode(out[:out.index(end)] if end in out else out)
    assert any(end in alone(model, p[-20:], 12, temperature=0.0, stop_tokens=(end,)) for p in ps)


def test_the_draw_follows_the_distribution_and_skips_zero_probabilities():
    """inverse_cdf: one uniform number per row; the frequencies match the probabilities, a
    zero-probability token never comes, and u at the edges stays in range."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    tokens = inverse_cdf(probs.expand(20000, -1), u)
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    assert inverse_cdf(probs, torch.tensor([0.0])).item() == 0
    assert inverse_cdf(probs, torch.tensor([1.0 - 1e-7])).item() == 3
