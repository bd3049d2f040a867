"""export.py: a danlu run -> a Hugging Face folder that transformers loads with the same logits,
greedy tokens and tokenizer ids; -> an ONNX file that onnxruntime runs with the same logits."""
import dataclasses
import json
import os

import pytest
import torch

from engine import generate
import export
from checkpoint import save_checkpoint
from convert import ConvertError
from model import GPT, GPTConfig
from tokenizer import CHAT_TOKENS, END_OF_TURN, CharTokenizer, TiktokenTokenizer, VocabTokenizer

TEXT = "ROMEO: hear me, 你好 🙂\nJULIET: speak."


def make_run(folder, config: GPTConfig, tok, log: bool = True) -> GPT:
    """weight/<run>: ckpt.pt (random weights, spread out so a mix-up shows), log.jsonl."""
    torch.manual_seed(0)
    model = GPT(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    train_config = {"dataset": "shakespeare_char", "max_iters": 20, "learning_rate": 1e-3, "init_from": "scratch"}
    save_checkpoint(os.path.join(folder, "ckpt.pt"), {
        "model": model.state_dict(), "model_config": dataclasses.asdict(config), "tokenizer": tok.to_meta(),
        "train_config": train_config, "iter_num": 20})
    if log:
        records = [{"iter": 10, "elapsed_s": 1.5, "train_loss": 3.2, "lr": 1e-3, "tok_per_s": 1234.0},
                   {"iter": 20, "elapsed_s": 3.0, "train_loss": 2.9, "lr": 1e-3, "tok_per_s": 1300.0},
                   {"iter": 20, "elapsed_s": 3.2, "val_loss": 2.95}]
        with open(os.path.join(folder, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return model.eval()


def char_chat_tokenizer():
    tok = CharTokenizer.from_text(TEXT)
    tok.add_special_tokens(CHAT_TOKENS)
    return tok


LAYOUTS = {  # name: (GPTConfig switches, tokenizer, architecture)
    "gpt2_char_chat": (dict(mlp="gelu"), char_chat_tokenizer, "GPT2LMHeadModel"),
    "llama_gqa_untied_gpt2bpe": (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                                      tie_embeddings=False), lambda: TiktokenTokenizer("gpt2"), "LlamaForCausalLM"),
    "qwen2_vocab": (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True),
                    lambda: VocabTokenizer(["<UNK>", "<CLS>", "a", "b", "c"], {"<UNK>": 0, "<CLS>": 1},
                                           unk_token="<UNK>"), "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_hf_export_loads_in_transformers_with_identical_output(tmp_path, name, request):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    switches, make_tok, arch = LAYOUTS[name]
    if "gpt2bpe" in name:
        request.getfixturevalue("gpt2_available")
    tok = make_tok()
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=tok.vocab_size, **switches)
    run, dest = tmp_path / "run", tmp_path / "hf"
    model = make_run(str(run), config, tok)
    assert export.main([f"--out_dir={run}", "--format=hf", f"--dest={dest}"])["architecture"] == arch
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "README.md"):
        assert (dest / f).exists(), f
    assert not [f for f in os.listdir(dest) if f.endswith(".tmp")]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(dest))
    assert type(hf).__name__ == arch
    text = "a b c b a" if name == "qwen2_vocab" else TEXT
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max().item() < 1e-5
    eos = hf.generation_config.eos_token_id
    stop = (eos,) if eos is not None else ()
    with torch.no_grad():
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
    got = generate(model, x, 12, temperature=0.0, stop_tokens=stop)
    assert got.tolist() == want[:, :got.size(1)].tolist()  # HF stops at eos: danlu repeats it
    if name == "gpt2_char_chat":  # the chat template is danlu's: same ids as render_conversation
        from tokenizer import render_conversation
        messages = [{"role": "user", "content": "hear me"}]
        rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == \
            render_conversation(tok, messages, add_generation_prompt=True)[0]
        assert eos == tok.token_id(END_OF_TURN)


def test_char_and_vocab_tokenizer_json_load_in_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    for tok, text in ((char_chat_tokenizer(), TEXT + "§"), (LAYOUTS["qwen2_vocab"][1](), "a zz <CLS> c")):
        config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size)
        run = tmp_path / tok.kind
        make_run(str(run), config, tok, log=False)
        export.main([f"--out_dir={run}", f"--dest={run / 'hf'}"])
        loaded = tokenizers.Tokenizer.from_file(str(run / "hf" / "tokenizer.json"))
        ids = loaded.encode(text).ids
        if tok.kind == "char":  # an unknown character is dropped by both
            assert ids == tok.encode(text)
        else:  # HF spells specials in text; the rest reads as danlu's tokens
            assert ids == tok.encode_tokens(text)
        assert loaded.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_model_card_holds_config_and_measured_figures(tmp_path):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40)
    run = tmp_path / "myrun"
    make_run(str(run), config, char_chat_tokenizer())
    export.main([f"--out_dir={run}", f"--dest={tmp_path / 'hf'}"])
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "# myrun" in card and "GPT2LMHeadModel" in card and "`shakespeare_char`" in card
    assert "20 iterations in 3 s; last train loss 2.9000" in card
    assert "best val loss 2.9500 at iteration 20" in card and "tokens/s" in card
    assert '"learning_rate": 0.001' in card  # the training config, whole


@pytest.mark.parametrize("switch", [dict(mlp="relu2"), dict(qk_norm=True), dict(logit_softcap=30.0)])
def test_export_refuses_switches_hf_cannot_express(tmp_path, switch):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40, **switch)
    run = tmp_path / "run"
    make_run(str(run), config, char_chat_tokenizer(), log=False)
    key = next(iter(switch))
    with pytest.raises(ConvertError, match=rf"{run}: {key} = .* is not supported.*--format=onnx"):
        export.main([f"--out_dir={run}", f"--dest={tmp_path / 'hf'}"])
    assert not os.path.exists(tmp_path / "hf" / "config.json")


def test_onnx_export_matches_pytorch_on_dynamic_shapes(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50, pos_emb="rope",
                       norm="rmsnorm", mlp="relu2", n_kv_head=2, qk_norm=True, logit_softcap=15.0)
    run = tmp_path / "run"
    model = make_run(str(run), config, char_chat_tokenizer(), log=False)
    out = export.main([f"--out_dir={run}", "--format=onnx", f"--dest={tmp_path / 'onnx'}"])
    # model.onnx, and the output policy's note of what export wrote there
    assert out["max_abs_diff"] < 1e-4 and sorted(os.listdir(tmp_path / "onnx")) == [".danlu-output.json", "model.onnx"]
    session = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
    for shape in ((4, 2), (1, 32)):
        x = torch.randint(0, 50, shape)
        got = session.run(["logits"], {"input_ids": x.numpy()})[0]
        with torch.no_grad():
            assert (torch.from_numpy(got) - model(x)[0]).abs().max().item() < 1e-4


def test_export_needs_out_dir_and_dest():
    with pytest.raises(ValueError, match="--out_dir=weight/<run>.*--dest=DIR"):
        export.main(["--out_dir=weight/x"])
    with pytest.raises(ValueError, match="format"):
        export.main(["--out_dir=weight/x", "--dest=y", "--format=tflite"])


def test_a_char_model_without_special_tokens_claims_no_bos_or_eos(tmp_path):
    """Left out, transformers' GPT-2 config would say bos = eos = 50256, outside a char vocabulary."""
    tok = CharTokenizer.from_text(TEXT)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size)
    make_run(str(tmp_path / "run"), config, tok)
    export.main([f"--out_dir={tmp_path / 'run'}", "--format=hf", f"--dest={tmp_path / 'hf'}"])
    hf = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf["bos_token_id"] is None and hf["eos_token_id"] is None
