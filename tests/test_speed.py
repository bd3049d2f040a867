"""What the speed work changed, pinned as behaviour (no timings): sampling past the context
window with a shifted KV cache, the CPU bf16 decision, fused AdamW, compile's C++ compiler check,
the cached matmul peak."""
import pytest
import torch

from engine import generate
from model import GPT, GPTConfig

V = 37


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=12, vocab_size=V, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def shifted_windows(prompt_len: int, n_new: int, block: int) -> list[int]:
    """How many of the latest tokens each new token is predicted from with the cache: all of
    them while they fit, then (once the cache is full) the most recent block - block // 4,
    growing by one per token until the cache is full again."""
    keep = block - max(1, block // 4)
    lengths, L = [], min(prompt_len, block)
    for _ in range(n_new):
        lengths.append(L)
        L = L + 1 if L < block else keep
    return lengths


@pytest.mark.parametrize("kw", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "n_kv_head": 1}])
@pytest.mark.parametrize("prompt_len", [3, 20])
def test_past_the_window_each_token_is_an_exact_crop(kw, prompt_len):
    """Past block_size the cached path predicts every token exactly as a full forward over the
    last L tokens does, L given by the context-shift schedule (never below 3/4 block_size);
    learned and rotary positions alike, and from a prompt longer than the window."""
    model = tiny(**kw)
    block = model.config.block_size
    x = torch.randint(0, V, (2, prompt_len))
    out = generate(model, x, 40, temperature=0.0, use_cache=True)
    lengths = shifted_windows(prompt_len, 40, block)
    assert min(lengths) >= block - block // 4 or prompt_len < block
    for i, L in enumerate(lengths):
        j = prompt_len + i  # out[:, j] was predicted from out[:, j - L:j]
        with torch.no_grad():
            expected = model(out[:, j - L:j])[0][:, -1].argmax(-1)
        assert torch.equal(out[:, j], expected), f"token {i} (window {L})"


def test_within_the_window_cache_equals_exact_crop_then_differs_only_in_window():
    """Greedy tokens equal use_cache=False (nanoGPT's crop) for the first block_size tokens;
    the cache only changes what the model sees once the text is longer than the window."""
    model = tiny(pos_emb="rope")
    x = torch.randint(0, V, (1, 1))
    block = model.config.block_size
    cached = generate(model, x, 30, temperature=0.0, use_cache=True)
    crop = generate(model, x, 30, temperature=0.0, use_cache=False)
    assert torch.equal(cached[:, :block + 1], crop[:, :block + 1])


def test_sampling_past_the_window_is_reproducible_and_stops():
    model = tiny()
    x = torch.randint(0, V, (2, 4))
    runs = [generate(model, x, 30, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
            for _ in range(2)]
    assert runs[0].shape == (2, 34) and torch.equal(runs[0], runs[1])
    first = generate(model, x[:1], 20, temperature=0.0)[0, 19].item()  # a token past the window
    out = generate(model, x[:1], 30, temperature=0.0, stop_tokens=[first])
    assert out[0, -1].item() == first and out.size(1) <= 4 + 20


def test_block_size_one_still_generates():
    model = tiny(block_size=1)
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 5, temperature=0.0)
    assert out.shape == (1, 6)


# ----------------------------------------------------------------------------- dtype = auto on a CPU

def cpu_run(dtype="float32"):
    import runtime
    return runtime.setup_runtime("cpu", dtype)


def wide(**kw) -> GPT:
    return tiny(n_embd=256, n_head=2, **kw).train()  # BF16_MIN_WIDTH: narrower keeps float32 unmeasured


def test_explicit_dtype_and_narrow_models_and_cpus_without_bf16_keep_float32(monkeypatch):
    import runtime
    monkeypatch.setattr(runtime, "probe_step_seconds", lambda *a, **k: pytest.fail("measured"))
    run = runtime.resolve_cpu_dtype(cpu_run(), wide(), 4, 12, "float32")  # explicit: untouched
    assert run.dtype == "float32"
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("a CPU with bf16", True))
    assert runtime.resolve_cpu_dtype(cpu_run(), tiny(), 4, 12, "auto").dtype == "float32"  # n_embd 16
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("a CPU without bf16", False))
    assert runtime.resolve_cpu_dtype(cpu_run(), wide(), 4, 12, "auto").dtype == "float32"


def test_the_probe_picks_the_faster_dtype_once_and_caches_it(tmp_path, monkeypatch, capsys):
    import runtime
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("a CPU with bf16", True))
    probes = []

    def fake_probe(model, rows, seq_len, autocast, steps=2):
        probes.append(rows * seq_len)
        return 0.5 if isinstance(autocast, torch.autocast) else 1.0  # bf16 twice as fast
    monkeypatch.setattr(runtime, "probe_step_seconds", fake_probe)
    run = runtime.resolve_cpu_dtype(cpu_run("auto"), wide(), 4, 12, "auto")
    assert run.dtype == "bfloat16" and run.ptdtype == torch.bfloat16 and isinstance(run.autocast, torch.autocast)
    assert probes == [48, 48] and "bfloat16" in capsys.readouterr().out
    assert (tmp_path / "cpu_dtype.json").exists()
    run = runtime.resolve_cpu_dtype(cpu_run("auto"), wide(), 4, 12, "auto")  # cached: no probe
    assert run.dtype == "bfloat16" and len(probes) == 2
    runtime.resolve_cpu_dtype(cpu_run("auto"), wide(), 1000, 12, "auto")  # capped at PROBE_TOKENS
    assert probes[-1] <= runtime.PROBE_TOKENS


def test_the_probe_leaves_weights_gradients_and_generator_alone():
    import runtime
    model = wide(dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    seconds = runtime.probe_step_seconds(model, 2, 12, torch.autocast("cpu", dtype=torch.bfloat16), steps=1)
    assert seconds > 0 and torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training


# ----------------------------------------------------------------------------- less work per step

def test_adamw_is_fused_on_cpu_and_falls_back_where_torch_has_no_kernel(monkeypatch):
    import train
    cfg = train.TrainConfig(learning_rate=1e-3)
    (opt,) = train.make_optimizers(cfg, tiny())
    assert opt.defaults["fused"] is True
    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be ... supported devices")
        return real(*args, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    (opt,) = train.make_optimizers(cfg, tiny())
    assert not opt.defaults["fused"]


def test_compile_on_a_cpu_without_a_cxx_compiler_fails_before_the_run_naming_the_key(monkeypatch):
    import sys
    from types import SimpleNamespace

    import train
    from parallel import parallelize
    from settings import ConfigError
    model, cpu = tiny(), SimpleNamespace(device_type="cpu", ddp=False)
    objective = train.Objective(model, loss_only=True)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ConfigError, match="no-such-c\\+\\+-compiler, which is not on PATH.*--compile=False") as e:
        parallelize(objective, model, train.TrainConfig(compile=True), cpu)
    assert e.value.key == "compile"
    assert parallelize(objective, model, train.TrainConfig(compile=False), cpu) is objective
    monkeypatch.setenv("CXX", sys.executable)  # any program on PATH passes the check; compiling is lazy
    assert parallelize(objective, model, train.TrainConfig(compile=True), cpu) is not objective


def test_the_matmul_peak_is_measured_once_per_machine_and_dtype(tmp_path, monkeypatch):
    import runtime
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(runtime, "measure_matmul_flops", lambda device, dtype: calls.append(dtype) or 1e9)
    assert runtime.peak_flops("cpu", "float32") == 1e9
    assert runtime.peak_flops("cpu", "float32") == 1e9 and calls == [torch.float32]
    runtime.peak_flops("cpu", "bfloat16")
    assert calls == [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------- dropout on a CPU

def test_cpu_dropout_keeps_one_minus_p_and_scales_like_torchs():
    """model.dropout on a CPU: every element is 0 or x / (1 - p), about 1 - p of them kept
    (p rounded to 1/65536), the mean kept, and the backward pass uses the forward's mask."""
    from model import dropout
    torch.manual_seed(0)
    x = torch.rand(400, 1000) + 0.5
    for p in (0.1, 0.2, 0.5):
        x.grad = None
        x.requires_grad_(True)
        y = dropout(x, p)
        kept = y != 0
        assert torch.allclose(y[kept], x[kept] / (1 - p))
        frac = kept.float().mean().item()
        assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # 5 sigma
        y.sum().backward()
        assert torch.equal(x.grad, kept.float() / (1 - p))
        assert abs(y.mean().item() / x.mean().item() - 1) < 0.01
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x


def test_cpu_dropout_follows_the_seed():
    """Its mask comes from torch's generator: the same seed, the same mask (exact resume)."""
    from model import dropout
    x = torch.ones(64, 64)
    torch.manual_seed(5)
    a = dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.3))
    assert not torch.equal(a, dropout(x, 0.3))


def test_training_attention_with_dropout_takes_the_math_path_on_a_cpu(monkeypatch):
    """SDPA with dropout on a CPU runs a slower math path of its own: the model's own math
    path runs instead (the same attention without dropout), and SDPA still runs in eval."""
    from model import CausalSelfAttention
    model = wide(dropout=0.1)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randint(0, V, (2, 12))
    model.train()
    model(x)
    assert calls == []
    model.eval()
    model(x)
    assert len(calls) == len(model.transformer.h)
    attn = model.transformer.h[0].attn
    q, k, v = torch.randn(3, 2, 4, 12, 8).unbind(0)
    torch.testing.assert_close(CausalSelfAttention._math_attention(q, k, v, None, True, 0.0),
                               real(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)
    assert attn.attn_impl == "sdpa"
