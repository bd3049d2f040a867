"""Hugging Face folders -> danlu: tiny random GPT-2 / Llama / Qwen2 models built with transformers
give the same logits, greedy tokens and tokenizer ids in danlu; danlu -> HF -> danlu is exact."""
import dataclasses
import json
import os
import sys

import pytest
import torch

from engine import generate
import checkpoint
import convert
from model import GPT, GPTConfig
from tokenizer import CHAT_TOKENS, CharTokenizer, TiktokenTokenizer, VocabTokenizer, from_meta

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MIXED = "Hello world, it's 2024!  x=3.14\n\n你好，世界！大语言模型 🙂👍🏽 café naïve\tend  "
CORPUS = ("The quick brown fox jumps over the lazy dog. 1234 5678 " * 20
          + "大语言模型会把一个汉字切成几个 token。你好，世界！" * 10 + " emoji 🙂👍🏽 café\n\n  tabs\t" * 10)
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's layout: a Split regex, then ByteLevel


def byte_bpe(style: str, path: str, added: list[str] = ()) -> "tokenizers.Tokenizer":
    """A byte-level BPE trained offline on CORPUS, pre-tokenized the way a model family does it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "qwen2")
    if style == "gpt2":
        tok.pre_tokenizer = byte_level
    elif style == "smollm2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    if added:
        tok.add_tokens(list(added))
    tok.save(path)
    return tok


def save_hf_model(model, folder: str, tokenizer_style: str | None = "qwen2", **save_kwargs):
    model.eval()
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer_style:
        byte_bpe(tokenizer_style, os.path.join(folder, "tokenizer.json"))
    return model


def assert_same_model(hf_model, folder: str, steps: int = 8):
    """Logits within 1e-5 (float32) and identical greedy continuations."""
    config, state, meta = checkpoint.load_pretrained(folder)
    model = GPT(config)
    model.load_state_dict(state)
    model.eval()
    x = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(x).logits
        got = model(x)[0]
    assert (got - want).abs().max().item() < 1e-5
    prompt = x[:1, :5]
    with torch.no_grad():
        hf_tokens = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(model, prompt, steps, temperature=0.0).tolist() == hf_tokens.tolist()
    return config, state, meta


def tiny_llama(**kw):
    base = dict(vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw}))


# ----------------------------------------------------------------------------- import: models

def test_gpt2_import_matches_transformers(tmp_path, gpt2_available):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50257, layer_norm_epsilon=1e-5))
    save_hf_model(hf, str(tmp_path), tokenizer_style=None)  # weights only: GPT-2 implies its tokenizer
    config, state, meta = assert_same_model(hf, str(tmp_path))
    assert config.mlp == "gelu_tanh" and config.pos_emb == "learned" and config.tie_embeddings
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert meta["kind"] == "tiktoken" and meta["encoding"] == "gpt2"


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "llama_attention_bias", "qwen2_qkv_bias"])
def test_llama_family_import_matches_transformers(tmp_path, variant):
    torch.manual_seed(0)
    if variant == "llama_gqa_untied":
        hf = tiny_llama(num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    elif variant == "llama_attention_bias":
        hf = tiny_llama(attention_bias=True, tie_word_embeddings=True)
        for name, p in hf.named_parameters():  # random biases, so a dropped one would show
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=420, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True))
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    save_hf_model(hf, str(tmp_path))
    config, _, meta = assert_same_model(hf, str(tmp_path))
    assert checkpoint.tokenizer_meta(str(tmp_path)) == {k: v for k, v in meta.items() if k != "source"}
    assert (config.pos_emb, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu")
    if variant == "llama_gqa_untied":
        assert config.n_kv_head == 2 and not config.tie_embeddings and config.rope_theta == 500.0
        assert config.norm_eps == 1e-5
    elif variant == "qwen2_qkv_bias":
        assert config.qkv_bias and not config.bias and config.n_kv_head == 1
    else:
        assert config.bias and not config.qkv_bias
    assert meta["kind"] == "bpe" and meta["normalization"] == "NFC"


def test_sharded_folder_with_index(tmp_path):
    torch.manual_seed(0)
    hf = save_hf_model(tiny_llama(num_key_value_heads=2), str(tmp_path), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert_same_model(hf, str(tmp_path))


def test_safetensors_files_agree_with_the_library(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 3).to(torch.bfloat16), "d": torch.randn(3).half()}
    convert.write_safetensors(str(tmp_path / "mine.safetensors"), tensors)
    theirs = safetensors_torch.load_file(str(tmp_path / "mine.safetensors"))
    safetensors_torch.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    mine = convert.read_safetensors(str(tmp_path / "theirs.safetensors"))
    for k, t in tensors.items():
        assert torch.equal(theirs[k], t) and torch.equal(mine[k], t) and mine[k].dtype == t.dtype
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(convert.ConvertError, match="bad.safetensors: not a readable safetensors"):
        convert.read_safetensors(str(tmp_path / "bad.safetensors"))


# ----------------------------------------------------------------------------- import: tokenizers

@pytest.mark.parametrize("style", ["gpt2", "smollm2", "qwen2"])
def test_byte_level_bpe_gives_the_original_ids(tmp_path, style):
    path = str(tmp_path / "tokenizer.json")
    original = byte_bpe(style, path, added=["<tool_call>"])
    with open(path, encoding="utf-8") as f:
        meta = convert.bpe_meta(json.load(f), path)
    tok = from_meta(json.loads(json.dumps(meta)))  # through meta.json text, as a dataset keeps it
    for text in (MIXED, CORPUS[:300], "a<tool_call>b 12 345  \n", "  leading and 7 trailing 8  "):
        assert tok.encode(text) == original.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert not set(tok.encode("<|endoftext|><|im_end|>")) & {0, 1, 2}  # text never becomes a special


def test_gpt2_tokenizer_json_becomes_tiktoken_gpt2(tmp_path, gpt2_available):
    """GPT-2's own tokenizer.json (written here from tiktoken's table: no download) reads back as
    tiktoken's gpt2, and transformers' fast tokenizer on it gives tiktoken's ids."""
    gpt2 = TiktokenTokenizer("gpt2").to_meta()
    (tmp_path / "tokenizer.json").write_text(json.dumps(convert.tokenizer_json(gpt2)), encoding="utf-8")
    meta = convert.folder_tokenizer(str(tmp_path), {"model_type": "gpt2"})
    assert meta["kind"] == "tiktoken" and meta["encoding"] == "gpt2"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(MIXED + CORPUS[:400])["input_ids"] == TiktokenTokenizer("gpt2").encode(MIXED + CORPUS[:400])


def test_tokenizers_that_cannot_convert_say_why(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    sp = Tokenizer(models.BPE({"▁a": 0, "b": 1, "<unk>": 2}, [], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    with pytest.raises(convert.ConvertError, match="not a byte-level BPE.*Llama 2"):
        convert.bpe_meta(json.loads(sp.to_str()), "sp/tokenizer.json")
    path = str(tmp_path / "tokenizer.json")
    byte_bpe("gpt2", path)
    tj = json.load(open(path, encoding="utf-8"))
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(convert.ConvertError, match="pre_tokenizer"):
        convert.bpe_meta(tj, path)


def test_vocabularies_beyond_uint16_are_refused_for_training_not_truncated():
    meta = {"vocab_size": 151646, "kind": "bpe"}
    with pytest.raises(convert.ConvertError, match=r"151,646 ids.*uint16.*sample.py.*GPT-2.*SmolLM2"):
        convert.check_fits_uint16(meta, "Qwen/Qwen2-0.5B")
    convert.check_fits_uint16({"vocab_size": 49152}, "SmolLM2")  # fits: no error


def test_vocab_kind_user_text_never_becomes_a_special_token():
    tok = VocabTokenizer(["<UNK>", "<IMG>", "a", "b"], {"<UNK>": 0, "<IMG>": 1}, unk_token="<UNK>")
    tok.add_special_tokens(CHAT_TOKENS)
    assert tok.encode("a <|end|> <IMG> b") == [2, 0, 0, 3]  # specials read as unknown words
    assert tok.encode_tokens("<IMG> a <|end|>") == [1, 2, tok.token_id("<|end|>")]  # programs spell them
    strict = VocabTokenizer(["a", "<|end|>"], {"<|end|>": 1})
    with pytest.raises(KeyError, match="special token"):
        strict.encode("a <|end|>")


# ----------------------------------------------------------------------------- sources and errors

def test_a_danlu_run_is_a_source_too(tmp_path):
    from checkpoint import save_checkpoint
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40)
    model = GPT(config)
    meta = CharTokenizer.from_text("abcdef").to_meta()
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": model.state_dict(), "model_config": dataclasses.asdict(config),
                                                "tokenizer": meta, "train_config": {}, "iter_num": 3})
    got, state, got_meta = checkpoint.load_pretrained(str(tmp_path))
    assert got == config and got_meta == meta and torch.equal(state["lm_head.weight"], model.lm_head.weight)


def test_unknown_sources_and_models_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(convert.ConvertError, match="not a GPT-2 name"):
        checkpoint.load_pretrained(str(tmp_path / "nothing"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(convert.ConvertError, match="pip install huggingface_hub.*local folder"):
        checkpoint.load_pretrained("gpt2-medium")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    convert.write_safetensors(str(tmp_path / "model.safetensors"), {"x": torch.zeros(1)})
    with pytest.raises(convert.ConvertError, match="'bert'.*GPT2LMHeadModel, LlamaForCausalLM"):
        checkpoint.load_pretrained(str(tmp_path))
    scaled = tiny_llama().config.to_dict() | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(convert.ConvertError, match="rope_scaling"):
        convert.llama_from_hf(scaled, {}, "config.json")


def test_gpt2_name_offline_says_to_pass_a_folder(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def offline(repo_id, **kwargs):  # what the hub client raises with no cache and no network
        calls.append((repo_id, kwargs.get("local_files_only", False)))
        raise hub.errors.LocalEntryNotFoundError("no cache,\nand no connection")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(convert.ConvertError, match="gpt2: could not download.*local folder") as e:
        checkpoint.pretrained_checkpoint("gpt2")
    assert "\n" not in str(e.value)
    assert calls == [("openai-community/gpt2", True), ("openai-community/gpt2", False)]  # cache first


# ----------------------------------------------------------------------------- danlu -> HF -> danlu

ROUND_TRIPS = {
    "gpt2": dict(mlp="gelu"),
    "gpt2_untied_eps_width": dict(mlp="gelu_tanh", tie_embeddings=False, norm_eps=1e-6, mlp_hidden=48),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False,
                  rope_theta=1000.0),
    "qwen2": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, qkv_bias=True),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_danlu_hf_danlu_round_trip_is_exact(tmp_path, name):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=70, **ROUND_TRIPS[name])
    model = GPT(config)
    for p in model.parameters():  # biases and gains away from their init, so a swap would show
        torch.nn.init.normal_(p, std=0.1)
    state = model.state_dict()
    meta = CharTokenizer.from_text("hello world, 你好").to_meta()
    arch = convert.save_hf(config, state, meta, str(tmp_path))
    assert arch == {"gpt2": "GPT2LMHeadModel", "gpt2_untied_eps_width": "GPT2LMHeadModel",
                    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[name]
    back, back_state, back_meta = checkpoint.load_pretrained(str(tmp_path))
    assert back == config
    assert back_state.keys() == state.keys()
    assert all(torch.equal(back_state[k], state[k]) for k in state)
    assert {k: v for k, v in back_meta.items() if k != "source"} == meta


def test_round_trip_of_a_bias_free_gpt2_layout_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=30, bias=False)
    model = GPT(config).eval()
    convert.save_hf(config, model.state_dict(), CharTokenizer.from_text("abc").to_meta(), str(tmp_path))
    back, state, _ = checkpoint.load_pretrained(str(tmp_path))
    assert back.bias  # GPT-2 has biases: written as zeros
    again = GPT(back).eval()
    again.load_state_dict(state)
    x = torch.randint(0, 30, (2, 7))
    assert torch.allclose(again(x)[0], model(x)[0], atol=1e-6)


@pytest.mark.parametrize("switch", [dict(mlp="relu2"), dict(qk_norm=True), dict(logit_softcap=15.0),
                                    dict(pos_emb="rope", norm="layernorm"), dict(n_kv_head=2)])
def test_switches_without_an_hf_equivalent_are_named(tmp_path, switch):
    config = GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=16, vocab_size=30, **switch)
    key = next(k for k in switch if k != "pos_emb") if len(switch) > 1 else next(iter(switch))
    with pytest.raises(convert.ConvertError, match=rf"weight/x: {key} = .* is not supported") as e:
        convert.save_hf(config, GPT(config).state_dict(), CharTokenizer.from_text("a").to_meta(),
                        str(tmp_path), where="weight/x")
    assert "\n" not in str(e.value)
    assert not os.listdir(tmp_path)  # nothing written
