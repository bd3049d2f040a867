"""
A danlu run -> one GGUF file, the format llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

    save_gguf(config, state, meta, dest, dtype="f32"|"f16", name)  export.py --format=gguf

The file is written with the `gguf` package of the llama.cpp project, with the tensor names and
metadata keys of its convert_hf_to_gguf.py. Each danlu layout goes to the llama.cpp architecture
that computes the same function:
  learned + layernorm + gelu    "gpt2"        q|k|v fused, as danlu keeps them
  rope + rmsnorm + swiglu       "llama"       (Llama; GQA, untied, biases all optional)
    with q/k/v-only biases      "qwen2"
  rope + rmsnorm + relu2        "arcee"       (Arcee's AFM: Llama with a ReLU^2 MLP)
  rope + layernorm + gelu       "starcoder2"  (StarCoder2: LayerNorm, biases, a GELU MLP)
danlu rotates channel pairs (i, i + hs/2), as Hugging Face Llama does; llama.cpp's "llama" and
"arcee" rotate (2i, 2i + 1), so their q and k rows are permuted as convert_hf_to_gguf permutes a
Llama checkpoint's; "qwen2" and "starcoder2" rotate halves and take them as they are. llama.cpp
computes GELU as GPT-2's tanh approximation (through a float16 table), so an exact-GELU run
differs there by ~1e-3. The tokenizer goes in whole (byte-level BPE tokens, their merges, the
special tokens as control tokens, danlu's chat template), so the file needs nothing beside it.
QK-norm, a logit softcap, the mlp class head, mixture-of-experts runs and char / explicit-vocab
tokenizers have no llama.cpp counterpart here: each is a one-line ConvertError naming it.
"""
import dataclasses
import os

import numpy as np
import torch

from convert import (GPT2_PATTERN, ConvertError, byte_alphabet, end_token, fill_zero_biases, recover_merges,
                     swiglu_default_hidden, token_table, unsupported)
from model import GPTConfig
from tokenizer import CHAT_TOKENS, END_OF_TURN, ROLE_TOKENS, SPLIT_PATTERN, chat_template_jinja

# (pos_emb, norm) -> {mlp: llama.cpp architecture}
ARCHITECTURES = {("learned", "layernorm"): {"gelu": "gpt2", "gelu_tanh": "gpt2"},
                 ("rope", "rmsnorm"): {"swiglu": "llama", "relu2": "arcee"},
                 ("rope", "layernorm"): {"gelu": "starcoder2", "gelu_tanh": "starcoder2"}}
PERMUTED = ("llama", "arcee")  # rotate (2i, 2i + 1): q and k rows reordered
ZERO_BIASES = ("gpt2", "starcoder2")  # every bias required: a bias-free model writes zeros there

# llama.cpp has no free-form split regex: tokenizer.ggml.pre names one of its built-in
# pre-tokenizers (src/llama-vocab.cpp). The split patterns danlu meets, by the name of the one that
# splits text the same way.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DANLU_PATTERN = SPLIT_PATTERN  # the pattern of the BPEs danlu trains
PRE_TOKENIZERS = {
    GPT2_PATTERN: "gpt-2",
    LLAMA3_PATTERN: "llama-bpe",
    LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
    # SmolLM2 (digits one by one, then GPT-2's split), as convert.split_pattern spells it
    GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}").replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])"): "smollm",
    # the nearest llama.cpp has: the same pieces on text without CJK characters
    DANLU_PATTERN: "llama-bpe",
}
CJK_NOTE = ("danlu's trained BPE cuts CJK runs apart from the letters and punctuation around them, which no "
            "llama.cpp pre-tokenizer does; Llama 3's split stands in (the same pieces elsewhere). Measured: the "
            "same ids on all 17,309 lines of the Tang poems with an 8k table, but not guaranteed next to CJK text")
GELU_NOTE = ("mlp = 'gelu' (exact, erf): llama.cpp computes GELU as GPT-2's tanh approximation, through a "
             "float16 table; logits differ by about 1e-3")


def gguf_architecture(config: GPTConfig, meta: dict, where: str) -> str:
    """The llama.cpp architecture that computes what config does, or a one-line ConvertError
    naming the switch or tokenizer that llama.cpp has no counterpart for."""
    fix = "use --format=onnx, or sample it with sample.py"
    for key, value, usual, what in (
            ("qk_norm", config.qk_norm, False, "no llama.cpp architecture pairs QK-norm with danlu's other switches"),
            ("logit_softcap", config.logit_softcap, 0.0, "llama.cpp softcaps logits only in Gemma 2's layout"),
            ("cls_head", config.cls_head, "lm", "llama.cpp runs language models; the mlp class head is danlu's"),
            ("n_expert", config.n_expert, 0, "danlu's mixture of experts has no llama.cpp architecture here")):
        if value != usual:
            raise unsupported(where, key, value, f"{what}; {fix}")
    layouts = ARCHITECTURES.get((config.pos_emb, config.norm))
    if layouts is None:
        raise unsupported(where, "norm", config.norm, f"with pos_emb={config.pos_emb!r} llama.cpp's architectures "
                          f"need norm={'layernorm' if config.pos_emb == 'learned' else 'rmsnorm|layernorm'}; {fix}")
    arch = layouts.get(config.mlp)
    if arch is None:
        raise unsupported(where, "mlp", config.mlp, f"with pos_emb={config.pos_emb!r} and norm={config.norm!r} "
                          f"llama.cpp runs mlp={'|'.join(layouts)}; {fix}")
    if arch == "gpt2" and config.n_kv_head not in (0, config.n_head):
        raise unsupported(where, "n_kv_head", config.n_kv_head, "llama.cpp's gpt2 has no grouped-query attention "
                          "(rope + rmsnorm + swiglu models export as llama)")
    if arch == "arcee" and config.bias:
        raise unsupported(where, "bias", True, "llama.cpp's arcee (rope + rmsnorm + relu2) has no output or MLP "
                          "biases (qkv_bias alone is fine)")
    if arch == "llama" and config.qkv_bias and not config.bias:
        arch = "qwen2"
    check_tokenizer(meta, config.vocab_size, where)
    return arch


def check_tokenizer(meta: dict, n_vocab: int, where: str) -> str:
    """The llama.cpp pre-tokenizer that splits text as meta's tokenizer does, or a ConvertError
    naming what llama.cpp's BPE cannot reproduce."""
    if meta["kind"] not in ("tiktoken", "bpe"):
        raise unsupported(where, "tokenizer", meta["kind"], "llama.cpp reads byte-level BPE tokenizers (GPT-2's, "
                          "or one trained by prepare/tokenizer.py); export it with --format=hf|onnx")
    if meta.get("normalization"):
        raise unsupported(where, "tokenizer normalization", meta["normalization"],
                          "llama.cpp's BPE does not normalize text")
    if end_token(meta) is None:  # llama.cpp would take token 11 as the end
        raise ConvertError(f"{where}: its tokenizer has no end-of-text or end-of-turn token, which llama.cpp "
                           "needs to stop; export it with --format=hf|onnx")
    if meta["vocab_size"] > n_vocab:
        raise ConvertError(f"{where}: its tokenizer has {meta['vocab_size']:,} ids but the model only "
                           f"{n_vocab:,}; the checkpoint is damaged")
    gpt2 = meta["kind"] == "tiktoken" and meta.get("encoding", "gpt2") == "gpt2"
    pattern = GPT2_PATTERN if gpt2 else meta.get("pattern", meta.get("encoding"))
    if pattern not in PRE_TOKENIZERS:
        raise ConvertError(f"{where}: its tokenizer splits text with {str(pattern)[:60]!r}..., which none of "
                           "llama.cpp's pre-tokenizers does (it knows GPT-2's, Llama 3's, Qwen2's, SmolLM2's "
                           "and danlu's trained one); export it with --format=hf|onnx")
    return PRE_TOKENIZERS[pattern]


# ----------------------------------------------------------------------------- tokenizer

def add_tokenizer(writer, meta: dict, n_vocab: int, where: str) -> dict:
    """tokenizer.ggml.*: every id up to the model's vocab_size has a token (byte-level text as
    in tokenizer.json, special tokens as control tokens, holes and padding as unused ones), the
    merges that rebuild the table, bos/eos/eot and the chat template. Returns what it wrote."""
    import gguf
    pre = check_tokenizer(meta, n_vocab, where)
    table, pattern = token_table(meta)
    specials = {i: name for name, i in meta.get("special_tokens", {}).items()}
    added = {i: text for text, i in (meta.get("added_tokens") or {}).items()}
    char = byte_alphabet()
    text = lambda b: "".join(char[x] for x in b)

    def entry(i: int) -> tuple:
        if i in specials:
            return specials[i], gguf.TokenType.CONTROL
        if i in added:  # matched whole in text, before the split
            return added[i], gguf.TokenType.USER_DEFINED
        if i < len(table) and table[i] is not None:
            return text(table[i]), gguf.TokenType.NORMAL
        return f"[PAD{i}]", gguf.TokenType.UNUSED  # a hole in the table, or the model's padding

    tokens, types = zip(*map(entry, range(n_vocab)))
    merges = [f"{text(a)} {text(b)}" for a, b in recover_merges(table)]
    ids, eos = meta.get("special_tokens", {}), end_token(meta)
    bos = meta.get("bos_token") or ("<|endoftext|>" if "<|endoftext|>" in ids else eos)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids[bos])
    writer.add_eos_token_id(ids[eos])
    writer.add_add_bos_token(False)  # danlu never prepends one
    writer.add_add_eos_token(False)
    chat = all(t in ids for t in CHAT_TOKENS)
    if chat:
        writer.add_eot_token_id(ids[END_OF_TURN])
        writer.add_chat_template(chat_template_jinja())
    return {"pre_tokenizer": pre, "eos": eos, "chat": chat, "pattern": pattern}


# ----------------------------------------------------------------------------- weights

def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (weight or bias) from rotate-half order, channels (i, i + hs/2) rotated
    together, to llama.cpp's "llama" order, channels (2i, 2i + 1): convert_hf_to_gguf's permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlp_hidden(config: GPTConfig) -> int:
    if config.mlp_hidden:
        return config.mlp_hidden
    return swiglu_default_hidden(config.n_embd) if config.mlp == "swiglu" else 4 * config.n_embd


def gguf_tensors(config: GPTConfig, state: dict, arch: str) -> dict[str, torch.Tensor]:
    """danlu's state dict under llama.cpp's tensor names (gguf.TENSOR_NAMES) for arch."""
    import gguf
    T = gguf.MODEL_TENSOR
    name = lambda t, kind, i=None: f"{gguf.TENSOR_NAMES[t].format(bid=i)}.{kind}"
    out = {name(T.TOKEN_EMBD, "weight"): state["transformer.wte.weight"]}
    if "transformer.wpe.weight" in state:
        out[name(T.POS_EMBD, "weight")] = state["transformer.wpe.weight"]
    layer = {"ln_1": T.ATTN_NORM, "ln_2": T.FFN_NORM, "attn.c_proj": T.ATTN_OUT, "mlp.c_proj": T.FFN_DOWN}
    if arch == "gpt2":
        layer["attn.c_attn"] = T.ATTN_QKV  # llama.cpp's gpt2 keeps q|k|v fused, as danlu does
    if config.mlp != "swiglu":
        layer["mlp.c_fc"] = T.FFN_UP
    renames = {"ln_f": (T.OUTPUT_NORM, None)}  # danlu module -> (tensor, block)
    renames.update({f"h.{i}.{k}": (t, i) for i in range(config.n_layer) for k, t in layer.items()})
    nh, hs = config.n_head, config.n_embd // config.n_head
    nkv = config.n_kv_head or nh
    for key, t in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".")
        if module in renames:
            tensor, block = renames[module]
            out[name(tensor, kind, block)] = t
        elif module.endswith("attn.c_attn"):  # q|k|v: one matrix in danlu, three in llama.cpp
            i = int(module.split(".")[1])
            q, k, v = t.split([nh * hs, nkv * hs, nkv * hs])
            if arch in PERMUTED:
                q, k = permute_rope(q, nh), permute_rope(k, nkv)
            out.update({name(T.ATTN_Q, kind, i): q, name(T.ATTN_K, kind, i): k, name(T.ATTN_V, kind, i): v})
        elif module.endswith("mlp.c_fc"):  # swiglu's gate|value: one matrix in danlu, gate first
            i = int(module.split(".")[1])
            gate, up = t.chunk(2)
            out.update({name(T.FFN_GATE, kind, i): gate, name(T.FFN_UP, kind, i): up})
    if not config.tie_embeddings:
        out[name(T.OUTPUT, "weight")] = state["lm_head.weight"]
    declared = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]]
    known = {n.format(bid=i) for n in declared for i in range(config.n_layer)}
    strays = [n for n in out if n.rpartition(".")[0] not in known]
    assert not strays, strays  # every name is one llama.cpp's architecture declares
    return out


def add_hparams(writer, config: GPTConfig, arch: str, dtype: str) -> None:
    """The {arch}.* keys convert_hf_to_gguf writes for these architectures."""
    import gguf
    C, nh = config.n_embd, config.n_head
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(C)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(mlp_hidden(config))
    writer.add_head_count(nh)
    writer.add_head_count_kv(config.n_kv_head or nh)
    if config.norm == "layernorm":
        writer.add_layer_norm_eps(config.norm_eps or 1e-5)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps or 1e-6)
    if config.pos_emb == "rope":
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(C // nh)
        writer.add_key_length(C // nh)
        writer.add_value_length(C // nh)
        writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)


def stored(name: str, t: torch.Tensor, dtype: str) -> np.ndarray:
    """float16 for matrices with f16; float32 for vectors, norms and learned positions (as
    convert_hf_to_gguf keeps them)."""
    half = dtype == "f16" and t.dim() == 2 and not name.startswith("position_embd")
    return t.detach().to(torch.float16 if half else torch.float32).cpu().contiguous().numpy()


# ----------------------------------------------------------------------------- the file

def save_gguf(config: GPTConfig, state: dict, meta: dict, dest: str, dtype: str = "f32", name: str = "",
              where: str = "") -> dict:
    """Write dest/model.gguf (atomically: a temp file, then renamed) and, for Ollama, dest/Modelfile;
    a model llama.cpp cannot run is refused before dest is made. Returns {path, architecture,
    pre_tokenizer, notes}."""
    where = where or dest
    arch = gguf_architecture(config, meta, where)
    try:
        import gguf
    except ImportError:
        raise ConvertError("--format=gguf needs the gguf package (llama.cpp's writer): pip install gguf") from None
    os.makedirs(dest, exist_ok=True)
    if arch in ZERO_BIASES:  # every bias is required there: a bias-free model writes zeros
        state = fill_zero_biases(dataclasses.replace(config, bias=True), dict(state))
    path = os.path.join(dest, "model.gguf")
    tmp = f"{path}.{os.getpid()}.tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or os.path.basename(os.path.normpath(dest)))
        add_hparams(writer, config, arch, dtype)
        vocab = add_tokenizer(writer, meta, config.vocab_size, where)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, t in gguf_tensors(config, state, arch).items():
            writer.add_tensor(key, stored(key, t, dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    write_modelfile(dest, vocab)
    notes = [GELU_NOTE] if config.mlp == "gelu" else []
    notes += [CJK_NOTE] if vocab["pattern"] == DANLU_PATTERN else []
    return {"path": path, "architecture": arch, "pre_tokenizer": vocab["pre_tokenizer"], "notes": notes}


def write_modelfile(dest: str, vocab: dict) -> None:
    """dest/Modelfile for `ollama create NAME -f dest/Modelfile`: Ollama's templates are Go
    templates, not Jinja, so the chat format is spelled again in its language."""
    from files import atomic_write
    if vocab["chat"]:
        template = ("{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}" + END_OF_TURN + "{{ end }}"
                    + ROLE_TOKENS["assistant"])
    else:
        template = "{{ .Prompt }}"
    lines = ["FROM ./model.gguf", f'TEMPLATE """{template}"""', f'PARAMETER stop "{vocab["eos"]}"']
    with atomic_write(os.path.join(dest, "Modelfile"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def n_bytes(path: str) -> str:
    size = os.path.getsize(path)
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"

