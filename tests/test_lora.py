"""LoRA: new adapters leave the model unchanged; q/k/v adapters touch only their slice of the
fused projection; merging equals the adapters; sft.py --lora_rank trains and saves adapters only
(with the base's path and hash), resumes exactly in a new process, refuses a changed base; sample.py
and export.py (--merge, --format=hf) read the run; peft on transformers' GPT-2 and Llama with the
same A/B weights gives the same logits."""
import copy
import os
import shutil

import pytest
import torch

import sft
from checkpoint import CheckpointError, load_checkpoint, load_model, load_pretrained, save_checkpoint
from conftest import run_script
from engine import generate
from lora import LoRAConfig, LoRALinear, add_adapters, is_adapter, merge
from model import GPT, GPTConfig
from settings import ConfigError, load_config
from test_sft import CONFIG, read_log, tiny  # noqa: F401  (tiny: the pretrained char run, a fixture)
from train import TrainConfig

ALL = "q,k,v,o,mlp_in,mlp_out,head"
LAYOUTS = {
    "gpt2": dict(),
    "llama_gqa_untied": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                             qkv_bias=True, tie_embeddings=False),
    "moe": dict(n_expert=3, moe_top_k=2, moe_shared_expert=True, mlp_hidden=32),
}


def tiny_config(layout: str, **kw) -> GPTConfig:
    return GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32, **{**LAYOUTS[layout], **kw})


def randomize_adapters(model: GPT, std: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_new_adapters_leave_the_model_exactly_unchanged(layout):
    torch.manual_seed(0)
    base = GPT(tiny_config(layout)).eval()
    lora = add_adapters(copy.deepcopy(base), LoRAConfig(lora_rank=4, lora_targets=ALL, lora_new_tokens_from=36)).eval()
    x = torch.randint(0, 40, (2, 16))
    assert torch.equal(base(x)[0], lora(x)[0])
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)
    assert any(n == "transformer.wte.lora_rows" for n in trainable)
    A = lora.transformer.h[0].attn.c_attn.lora_A["q"]
    assert A.abs().sum() > 0  # A random, B zero
    assert lora.transformer.h[0].attn.c_attn.lora_B["q"].abs().sum() == 0


def test_q_k_v_adapters_touch_only_their_slice():
    """c_attn is one fused Linear: an update on k changes only k's columns (with GQA, fewer)."""
    torch.manual_seed(0)
    model = add_adapters(GPT(tiny_config("llama_gqa_untied")), LoRAConfig(lora_rank=2, lora_targets="k")).eval()
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LoRALinear) and list(c_attn.parts) == ["k"]
    x = torch.randn(3, 32)
    before = c_attn(x).detach()
    with torch.no_grad():
        c_attn.lora_B["k"].normal_()
    after = c_attn(x).detach()
    q_dim, kv_dim = 32, 16  # 4 heads of 8, 2 key/value heads
    changed = (after != before).any(0)
    assert not changed[:q_dim].any() and not changed[q_dim + kv_dim:].any()
    assert changed[q_dim:q_dim + kv_dim].all()
    assert not isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)  # not targeted: plain


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merged_model_computes_what_the_adapters_do(layout):
    """The merged model is plain (lora_rank 0); an adapted head on a tied embedding unties it."""
    torch.manual_seed(0)
    model = add_adapters(GPT(tiny_config(layout)), LoRAConfig(lora_rank=4, lora_targets=ALL, lora_new_tokens_from=36)).eval()
    randomize_adapters(model)
    merged = merge(model).eval()
    assert not isinstance(merged.lm_head, LoRALinear) and not merged.config.tie_embeddings
    assert not any(is_adapter(k) for k in merged.state_dict())
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], merged(x)[0], atol=1e-5)
        assert generate(model, x[:, :4], 10, temperature=0).tolist() == generate(merged, x[:, :4], 10, temperature=0).tolist()


def test_merge_keeps_a_tied_embedding_without_a_head_adapter():
    torch.manual_seed(0)
    model = add_adapters(GPT(tiny_config("gpt2")), LoRAConfig(lora_rank=2, lora_targets="q,v", lora_new_tokens_from=36)).eval()
    randomize_adapters(model)
    merged = merge(model).eval()
    assert merged.config.tie_embeddings and merged.lm_head.weight is merged.transformer.wte.weight
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], merged(x)[0], atol=1e-5)


def test_lora_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="lora_targets = 'q,attn'.*unknown target 'attn'.*q,k,v,o,mlp_in") as e:
        LoRAConfig(lora_rank=4, lora_targets="q,attn")
    assert e.value.key == "lora_targets"
    with pytest.raises(ConfigError, match="lora_targets = '': empty"):
        LoRAConfig(lora_rank=4, lora_targets="")
    with pytest.raises(ConfigError, match="lora_quant = 'nf4'.*CUDA GPU.*remove the key"):
        load_config(TrainConfig, ["--lora_quant=nf4"])
    with pytest.raises(ConfigError, match="lora_rank = -1"):
        load_config(TrainConfig, ["--lora_rank=-1"])


# ----------------------------------------------------------------------------- sft.py --lora_rank

LORA = ["--lora_rank=4", "--lora_alpha=8", f"--lora_targets={ALL}", "--learning_rate=1e-2", "--sample_prompts=hello"]


@pytest.fixture(scope="module")
def lora_run(tiny):  # noqa: F811
    summary = sft.main([CONFIG, *LORA, "--out_dir=weight/lora", "--epochs=3"])
    return summary


def test_sft_lora_trains_and_saves_adapters_only(tiny, lora_run, capsys):  # noqa: F811
    evals = [r for r in read_log("weight/lora") if "val_loss" in r]
    assert evals[-1]["val_loss"] < 0.6 * evals[0]["val_loss"], [e["val_loss"] for e in evals]
    for name in ("ckpt.pt", "best.pt"):
        ckpt = load_checkpoint(f"weight/lora/{name}")
        assert ckpt["model"] and all(is_adapter(k) for k in ckpt["model"])
        assert ckpt["lora_base"]["path"] == "weight/char_tiny" and len(ckpt["lora_base"]["sha256"]) == 64
        assert ckpt["lora"]["lora_rank"] == 4 and ckpt["lora"]["lora_new_tokens_from"] == 43
    ckpt = load_checkpoint("weight/lora/ckpt.pt")
    # a tied head shares the embedding's new-token rows: one tensor under two names
    n_adapter_tensors = len({t.data_ptr() for t in ckpt["model"].values()})
    assert sum(len(opt["state"]) for opt in ckpt["optimizer"]) == n_adapter_tensors
    full = os.path.getsize("weight/sft_char_tiny/ckpt.pt")
    assert os.path.getsize("weight/lora/ckpt.pt") < full / 2


def test_the_log_says_what_trains(tiny, capsys):  # noqa: F811
    r = run_script("sft.py", CONFIG, *LORA, "--out_dir=weight/lora_log", "--max_iters=2", "--eval_interval=100")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("LoRA rank 4"))
    assert "parameters train (" in line and "%)" in line


def test_sample_and_merge_read_the_lora_run(tiny, lora_run):  # noqa: F811
    """sample.py needs no flag; export --merge writes a plain run with the same greedy output;
    --format=hf exports the merged model."""
    model, ckpt = load_model("weight/lora")
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)
    run_script("export.py", "--out_dir=weight/lora", "--merge", "--dest=weight/lora_merged")
    merged = load_checkpoint("weight/lora_merged/ckpt.pt")
    assert "lora" not in merged and "lora_rank" not in merged["model_config"] and "optimizer" not in merged
    assert not any(is_adapter(k) for k in merged["model"])
    outputs = []
    for run in ("weight/lora", "weight/lora_merged"):
        r = run_script("sample.py", f"--out_dir={run}", "--start=add 2 3", "--temperature=0",
                       "--max_new_tokens=30")
        outputs.append(r.stdout)
    assert outputs[0] == outputs[1] and "add 2 3" in outputs[0]
    transformers = pytest.importorskip("transformers")
    run_script("export.py", "--out_dir=weight/lora", "--format=hf", "--dest=hf_lora")
    hf = transformers.AutoModelForCausalLM.from_pretrained("hf_lora").eval()
    merged_model, _ = load_model("weight/lora_merged")
    x = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, merged_model(x)[0], atol=1e-4)


def test_lora_resume_in_a_new_process_is_exact(tiny):  # noqa: F811
    common = [CONFIG, *LORA, "--lr_decay_iters=12", "--log_interval=1", "--eval_interval=100",
              "--sample_prompts=", "--lora_dropout=0.1"]
    run_script("sft.py", *common, "--out_dir=weight/lwhole", "--max_iters=12")
    run_script("sft.py", *common, "--out_dir=weight/lparts", "--max_iters=7")
    run_script("sft.py", *common, "--out_dir=weight/lparts", "--max_iters=12")  # init_from = auto
    losses = [[(r["iter"], r["train_loss"]) for r in read_log(d) if "lr" in r] for d in ("weight/lwhole", "weight/lparts")]
    assert [i for i, _ in losses[1]] == list(range(1, 13)) and losses[0] == losses[1]
    a, b = (load_checkpoint(f"weight/{d}/ckpt.pt")["model"] for d in ("lwhole", "lparts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_base_is_refused(tiny, lora_run):  # noqa: F811
    """Copy the base, build adapters on the copy, then change one weight of the copy: loading
    the adapters and resuming them are both refused, naming the base."""
    shutil.copytree("weight/char_tiny", "weight/base_copy", dirs_exist_ok=True)
    args = [CONFIG, *LORA, "--base=weight/base_copy", "--out_dir=weight/lora_copy", "--max_iters=4",
            "--eval_interval=2"]
    sft.main(args)
    for name in ("best.pt", "ckpt.pt"):
        path = f"weight/base_copy/{name}"
        if os.path.exists(path):
            ckpt = load_checkpoint(path)
            ckpt["model"]["transformer.ln_f.weight"] += 0.01
            save_checkpoint(path, ckpt)
    with pytest.raises(CheckpointError, match="LoRA base weight/base_copy changed since the adapters were trained"):
        load_model("weight/lora_copy")
    r = run_script("sample.py", "--out_dir=weight/lora_copy", "--start=a", check=False)
    assert r.returncode != 0 and r.stderr.startswith("error: weight/lora_copy: its LoRA base") and "Traceback" not in r.stderr
    with pytest.raises(CheckpointError, match="earlier weight/base_copy"):
        sft.main(args[:-2] + ["--max_iters=6"])


def test_train_py_lora_from_a_run(tiny):  # noqa: F811
    """train.py --init_from=<run> --lora_rank: continued pretraining with adapters only."""
    args = ["--dataset=char_tiny", "--init_from=weight/char_tiny", "--device=cpu", "--block_size=32",
            "--batch_size=4", "--max_iters=3", "--eval_iters=1", "--eval_interval=3", "--lora_rank=2",
            "--lora_targets=q,v", "--out_dir=weight/pre_lora"]
    import train
    train.main(args)
    ckpt = load_checkpoint("weight/pre_lora/ckpt.pt")
    assert all(is_adapter(k) for k in ckpt["model"]) and ckpt["lora_base"]["path"] == "weight/char_tiny"
    assert ckpt["lora"]["lora_new_tokens_from"] == 0  # same tokenizer: no new rows
    model, _ = load_model("weight/pre_lora")
    assert model.lora.lora_targets == "q,v"
    with pytest.raises(ConfigError, match="lora_rank = 2 trains adapters on pretrained weights"):
        train.main(args[:1] + args[2:-1] + ["--out_dir=weight/scratch_lora", "--init_from=scratch"])


# ----------------------------------------------------------------------------- peer check: peft

def copy_into_danlu(danlu: GPT, peft_model, hf_names: dict) -> None:
    """Give danlu's adapters peft's A/B weights. hf_names: danlu (module, part) -> peft module
    path (per layer, with {i}); q, k, v adapters on GPT-2's fused c_attn share its A and split B."""
    peft_params = dict(peft_model.named_parameters())
    modules = dict(danlu.named_modules())
    with torch.no_grad():
        for (module, part), (hf_module, rows) in hf_names.items():
            for i in range(danlu.config.n_layer) if "{i}" in module else [None]:
                m = modules[module.format(i=i)]
                prefix = "base_model.model." + hf_module.format(i=i)
                A = peft_params[f"{prefix}.lora_A.default.weight"]
                B = peft_params[f"{prefix}.lora_B.default.weight"]
                m.lora_A[part].copy_(A)
                m.lora_B[part].copy_(B if rows is None else B[rows])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_lora_on_transformers_gives_the_same_logits(tmp_path, family, request):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        request.getfixturevalue("gpt2_available")
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50257)).eval()
        hf.save_pretrained(str(tmp_path))
        C = 32
        names = {("transformer.h.{i}.attn.c_attn", p): ("transformer.h.{i}.attn.c_attn", slice(j * C, (j + 1) * C))
                 for j, p in enumerate("qkv")}
        names.update({("transformer.h.{i}.attn.c_proj", "o"): ("transformer.h.{i}.attn.c_proj", None),
                      ("transformer.h.{i}.mlp.c_fc", "mlp_in"): ("transformer.h.{i}.mlp.c_fc", None),
                      ("transformer.h.{i}.mlp.c_proj", "mlp_out"): ("transformer.h.{i}.mlp.c_proj", None),
                      ("lm_head", "head"): ("lm_head", None)})
        lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"],
                                   fan_in_fan_out=True, init_lora_weights=False)
    else:
        from test_convert import save_hf_model, tiny_llama
        hf = save_hf_model(tiny_llama(num_key_value_heads=2, tie_word_embeddings=False), str(tmp_path))
        parts = {"q": ("attn.c_attn", "self_attn.q_proj"), "k": ("attn.c_attn", "self_attn.k_proj"),
                 "v": ("attn.c_attn", "self_attn.v_proj"), "o": ("attn.c_proj", "self_attn.o_proj"),
                 "gate": ("mlp.c_fc", "mlp.gate_proj"), "up": ("mlp.c_fc", "mlp.up_proj"),
                 "mlp_out": ("mlp.c_proj", "mlp.down_proj")}
        names = {(f"transformer.h.{{i}}.{mine}", part): (f"model.layers.{{i}}.{theirs}", None)
                 for part, (mine, theirs) in parts.items()}
        names[("lm_head", "head")] = ("lm_head", None)
        lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    config, state, _ = load_pretrained(str(tmp_path))
    base = GPT(config)
    base.load_state_dict(state)
    danlu = add_adapters(copy.deepcopy(base), LoRAConfig(lora_rank=4, lora_alpha=8.0, lora_targets=ALL)).eval()
    peft_model = peft.get_peft_model(hf, lora_cfg).eval()  # init_lora_weights=False: B random too
    if family == "gpt2":  # one fused c_attn adapter == q, k, v adapters sharing A
        params = dict(peft_model.named_parameters())
        for i in range(2):
            assert params[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.default.weight"].abs().sum() > 0
    copy_into_danlu(danlu, peft_model, names)
    x = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        got = danlu(x)[0]
        plain = base.eval()(x)[0]
    assert (want - plain).abs().max() > 1e-3  # the adapters do something
    assert (got - want).abs().max().item() < 1e-5
