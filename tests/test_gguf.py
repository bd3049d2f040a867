"""export.py --format=gguf: a danlu run -> model.gguf that llama.cpp itself (llama-cpp-python) loads,
tokenizes as danlu does, renders danlu's chat format with, and decodes with danlu's greedy tokens
and logits, in float32 and float16; the switches llama.cpp has no counterpart for are one-line
errors. Skips where gguf or llama_cpp is not installed (pip install gguf llama-cpp-python)."""
import dataclasses
import functools
import os

import pytest
import torch

import export
from checkpoint import save_checkpoint
from conftest import SHARED
from convert import GPT2_PATTERN, ConvertError
from engine import generate
from model import GPT, GPTConfig
from tokenizer import (CHAT_TOKENS, END_OF_TURN, BPETokenizer, CharTokenizer, TiktokenTokenizer,
                       render_conversation)

PROMPT = "ROMEO: Is it e'en so? then I defy you, stars!  The 3 clocks\tstrike 10:45.\n\nJULIET: Ay me."
STEPS = 20
# |llama.cpp - danlu| logit, as a share of the largest |logit| of the sequence. Measured: f32 5e-7
# (llama, qwen2, arcee, with llama.cpp's KV cache in float32), 2-3e-4 where GELU runs through
# llama.cpp's float16 table (gpt2, starcoder2); f16 weights and llama.cpp's default float16 KV cache 4-7e-4
TOLERANCE = {"f32": 1e-3, "f16": 3e-3}


@functools.cache
def trained_bpe():
    """A small byte-level BPE as prepare/tokenizer.py trains one (its own split pattern), English and
    Chinese, plus the chat tokens."""
    pytest.importorskip("rustbpe")
    from prepare import tokenizer as prepare_tokenizer
    poems = os.path.join(SHARED, "data", "zh", "tang_poems.txt")
    zh = "秦川雄帝宅，函谷壯皇居。" * 200
    if os.path.exists(poems):
        with open(poems, encoding="utf-8") as f:
            zh = f.read(20_000)
    path = os.path.join(os.environ["DANLU_CACHE_DIR"], "gguf_corpus.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(zh + "\n" + PROMPT * 30 + "\nSome English text, to learn a few Latin merges too.\n" * 30)
    tok = prepare_tokenizer.train([path], 700)
    tok.add_special_tokens(CHAT_TOKENS)
    return tok


@functools.cache
def gpt2_bpe():
    try:
        tok = TiktokenTokenizer("gpt2")
    except RuntimeError:  # no tiktoken cache: the trained table stands in
        return trained_bpe()
    tok.add_special_tokens(CHAT_TOKENS)
    return tok


LAYOUTS = {  # name: (GPTConfig switches, tokenizer, llama.cpp architecture)
    "gpt2_tied_gpt2bpe": (dict(), gpt2_bpe, "gpt2"),
    "llama_gqa_untied_bpe": (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                                  tie_embeddings=False), trained_bpe, "llama"),
    "qwen2_qkv_bias_bpe": (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True,
                                rope_theta=5e5), trained_bpe, "qwen2"),
    # relu2 as danlu's CPU recipes use it (they add qk_norm, which has no llama.cpp counterpart), and
    # the Chinese recipe's layout (config/tang_bpe.py -> sft_zh)
    "arcee_relu2_gqa_bpe": (dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", n_kv_head=2, bias=False),
                            trained_bpe, "arcee"),
    "starcoder2_rope_layernorm_gelu_bpe": (dict(pos_emb="rope", mlp="gelu_tanh", bias=False, qkv_bias=True,
                                                tie_embeddings=False), trained_bpe, "starcoder2"),
}


def make_run(folder, switches: dict, tok, **changes) -> GPT:
    """weight/<run>/ckpt.pt: random weights, spread out (std 0.2) so that a mix-up shows, and
    the vocabulary padded to a multiple of 64 as danlu pads GPT-2's."""
    shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=96, vocab_size=-(-tok.vocab_size // 64) * 64)
    config = GPTConfig(**{**shape, **switches, **changes})
    torch.manual_seed(0)
    model = GPT(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_checkpoint(os.path.join(folder, "ckpt.pt"), {"model": model.state_dict(), "tokenizer": tok.to_meta(),
                                                      "model_config": dataclasses.asdict(config), "iter_num": 0})
    return model.eval()


def llama(path: str, n_ctx: int, kv_f32: bool = False):
    """llama.cpp on the file, one thread; kv_f32: keys and values cached in float32 (llama.cpp's
    default is float16)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
                           verbose=False, **kv)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_llama_cpp_reproduces_danlus_tokens_logits_and_greedy_reply(tmp_path, name, dtype):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    switches, make_tok, arch = LAYOUTS[name]
    tok = make_tok()
    model = make_run(str(tmp_path / "run"), switches, tok)
    dest = tmp_path / "gguf"
    written = export.main([f"--out_dir={tmp_path / 'run'}", "--format=gguf", f"--dest={dest}", f"--gguf_dtype={dtype}"])
    assert written["architecture"] == arch
    assert sorted(n for n in os.listdir(dest) if not n.startswith(".")) == ["Modelfile", "model.gguf"]
    llm = llama(written["path"], model.config.block_size, kv_f32=dtype == "f32")

    ids = tok.encode(PROMPT)  # llama.cpp's tokenizer gives danlu's ids
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == PROMPT

    x = torch.tensor([ids])
    want = generate(model, x, STEPS, temperature=0.0)[0].tolist()
    got = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        got.append(t)
        if len(got) == STEPS:
            break
    with torch.no_grad():  # danlu's logits along its own reply, and llama.cpp's on the same tokens
        logits = model(torch.tensor([want]))[0][0]
    llm.reset()
    llm.eval(want)
    theirs = torch.from_numpy(llm.scores[:len(want)].copy())
    scale = logits.abs().max().item()
    worst = (theirs - logits).abs().max().item() / scale
    assert worst < TOLERANCE[dtype], (name, dtype, worst)
    # the same greedy reply, unless two tokens were nearly tied where they part (f16, gpt2's GELU)
    reply = want[len(ids):]
    if got != reply:
        at = next(i for i, (a, b) in enumerate(zip(got, reply)) if a != b)
        top2 = logits[len(ids) - 1 + at].topk(2).values
        assert (top2[0] - top2[1]).item() / scale < 2 * TOLERANCE[dtype], (name, dtype, at, got, reply)
    if dtype == "f32" and "gelu" not in model.config.mlp:
        assert worst < 1e-5, worst  # without GELU's table llama.cpp computes what danlu does, to rounding
    llm.close()


# llama.cpp's own pre-tokenizer probe (convert_hf_to_gguf.py's chktxt), then mixed scripts
PROBES = ["\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
          "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
          "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
          "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
          "秦川雄帝宅，函谷壯皇居。", "我用Python写代码，速度很快！", "東京タワーへ行きます。カレーライス",
          "한국어 문장입니다.", "mixed: naïve café, 2024年10月1日, x² ≤ ∞ <|end|>", "tabs\tand\n\nnewlines  \r\n spaces  "]


@pytest.mark.parametrize("make_tok", [gpt2_bpe, trained_bpe], ids=["gpt2_bpe", "trained_bpe"])
def test_llama_cpp_tokenizes_text_as_danlu_does(tmp_path, make_tok):
    pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = make_tok()
    make_run(str(tmp_path / "run"), {}, tok, n_layer=1, n_embd=16)
    written = export.main([f"--out_dir={tmp_path / 'run'}", "--format=gguf", f"--dest={tmp_path / 'gguf'}"])
    llm = llama_cpp.Llama(model_path=written["path"], vocab_only=True, verbose=False)
    for text in PROBES:
        ids = tok.encode(text)  # a special token's name in text stays text, in both
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids) == text.encode(), text
    llm.close()


def test_chat_template_and_stop_token_are_danlus(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    switches, make_tok, _ = LAYOUTS["llama_gqa_untied_bpe"]
    tok = make_tok()
    make_run(str(tmp_path / "run"), switches, tok)
    written = export.main([f"--out_dir={tmp_path / 'run'}", "--format=gguf", f"--dest={tmp_path / 'gguf'}"])
    llm = llama(written["path"], 64)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hear me"},
                {"role": "assistant", "content": "I hear."}, {"role": "user", "content": "then speak <|end|>"}]
    # llama-cpp-python renders the file's template with Jinja (as llama-server --jinja does)
    template = llm.metadata["tokenizer.chat_template"]
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    prompt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=eos)(messages=messages).prompt
    want = render_conversation(tok, messages, add_generation_prompt=True)[0]
    # parsed with special tokens on, as a chat server does, a user's literal "<|end|>" becomes the
    # control token (danlu's encode never makes one from text): the one difference
    got = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    end = tok.token_id(END_OF_TURN)
    assert got != want and got.count(end) == want.count(end) + 1
    safe = messages[:3] + [{"role": "user", "content": "then speak"}]
    prompt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=eos)(messages=safe).prompt
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
        render_conversation(tok, safe, add_generation_prompt=True)[0]
    assert llm.token_eos() == tok.token_id(END_OF_TURN)  # replies stop at the end of the turn
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and '<|{{ .Role }}|>{{ .Content }}<|end|>' in modelfile
    llm.close()


def test_the_trained_split_pattern_copy_is_prepare_tokenizers():
    from convert import tokenizer_files
    from gguf_export import DANLU_PATTERN
    from tokenizer import chat_template_jinja as chat_template
    from prepare import tokenizer as prepare_tokenizer
    assert DANLU_PATTERN == prepare_tokenizer.SPLIT_PATTERN
    tok = CharTokenizer(list("ab"))
    tok.add_special_tokens(CHAT_TOKENS)
    assert tokenizer_files(tok.to_meta(), 8)["tokenizer_config.json"]["chat_template"] == chat_template()


BYTES = [bytes([b]) for b in range(256)]
REFUSED = [  # (switches, tokenizer, what the one-line error names)
    (dict(qk_norm=True, pos_emb="rope", norm="rmsnorm", mlp="swiglu"), None, "qk_norm = True"),
    (dict(logit_softcap=15.0), None, "logit_softcap = 15.0"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="gelu"), None, "mlp = 'gelu'"),
    (dict(mlp="swiglu"), None, "mlp = 'swiglu'"),
    (dict(norm="rmsnorm"), None, "norm = 'rmsnorm'"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", bias=True), None, "bias = True"),
    (dict(n_expert=4, mlp_hidden=32), None, "n_expert = 4"),
    (dict(n_kv_head=2), None, "n_kv_head = 2"),
    (dict(), lambda: CharTokenizer(list("abcdefgh")), "tokenizer = 'char'"),
    (dict(), lambda: BPETokenizer(BYTES, r"\S+|\s+", {"<|endoftext|>": 256}), "splits text with"),
    (dict(), lambda: BPETokenizer(BYTES, GPT2_PATTERN), "no end-of-text or end-of-turn token"),
]


@pytest.mark.parametrize("switches,make_tok,named", REFUSED, ids=[r[2].split()[0] for r in REFUSED])
def test_what_llama_cpp_cannot_run_is_a_one_line_error_and_writes_nothing(tmp_path, switches, make_tok, named):
    tok = make_tok() if make_tok else BPETokenizer(BYTES, GPT2_PATTERN, {"<|endoftext|>": 256})
    make_run(str(tmp_path / "run"), switches, tok)
    with pytest.raises(ConvertError) as e:
        export.main([f"--out_dir={tmp_path / 'run'}", "--format=gguf", f"--dest={tmp_path / 'gguf'}"])
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "gguf").exists()
