"""
Weights in and out: Hugging Face folders <-> danlu's (GPTConfig, state dict, tokenizer meta).

    load_pretrained("gpt2" | "HF_FOLDER" | "weight/<run>") -> (GPTConfig, state_dict, meta)
    pretrained_checkpoint(source)       checkpoint.load_model: an HF folder works as a run folder
    save_hf(config, state, meta, dest)  export.py: config.json, model.safetensors, tokenizer files

GPT-2 (GPT2LMHeadModel) and the Llama architecture (LlamaForCausalLM; Qwen2ForCausalLM, whose
q/k/v projections carry biases) map onto GPTConfig switches; the name mapping is in the two
*_from_hf / *_to_hf pairs below. A byte-level BPE tokenizer.json becomes the `bpe` tokenizer kind
(token bytes by id, the id being the tiktoken rank), GPT-2's own table becomes tiktoken's gpt2.
safetensors files are read and written here (a JSON header, then raw tensors), so importing
needs nothing but torch; `gpt2`..`gpt2-xl` are fetched with huggingface_hub when it is installed.
A folder is input from strangers: each file is checked before it is opened (inside the folder,
a regular file), each header and JSON file before anything is allocated for it (a safetensors
header that tiles its file, config.json sizes bounded by the weights present, tokenizer ids
bounded by its entries), and every problem is one line of ConvertError naming file and field.

Longer than the house's ~500 lines: every Hugging Face format danlu reads and writes (weights,
configs, tokenizer.json) and the checks a stranger's folder needs stay in the one place that
knows Hugging Face's names; the tokenizer half is the seam along which it would split next.
"""
import dataclasses
import json
import math
import os
import re

import torch
from torch import Tensor

from files import atomic_write
from model import GPT, GPTConfig
from settings import ConfigError
from tokenizer import (CHAT_TOKENS, END_OF_TURN, TiktokenTokenizer, chat_template_jinja, json_kind,
                       json_value, one_line, pattern_problem, small_file)

GPT2_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, each with one leading
# space; trailing whitespace stays apart from the next word
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
UINT16_LIMIT = 65536  # data/<name>/*.bin hold uint16 ids
FITS_UINT16 = ("GPT-2 (gpt2 .. gpt2-xl, 50,257 ids) and SmolLM / SmolLM2 (49,152 ids) fit; "
               "Qwen2 (151,646) and Llama 3 (128,256) do not")
PROBE_TEXT = ("Hello world, it's 2024!  Tabs\tand\nnew lines;  x=3.14159 "
              "你好，世界！大语言模型 🙂👍🏽 naïve café ÅNGSTRÖM   end")


class ConvertError(ValueError):
    """A folder, file or model that cannot be converted; the message names it and the fix."""


# ----------------------------------------------------------------------------- safetensors

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}


MAX_HEADER = 100 * 2**20  # a safetensors header (JSON) this long is not a model's; refuse before reading
MAX_DIMS = 8  # no weight has more; a header listing millions of dimensions would stall reshape


def shown(value) -> str:
    """A stranger's value for a message: its repr, cut short (it may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_safetensors(path: str) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file, as views of the memory-mapped file (pages are read
    when a tensor is used, so a model is never held twice). The header is checked whole first,
    so nothing is allocated for a file that lies about its tensors."""
    entries, data_start = safetensors_header(path)
    data = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)
    out = {}
    for name, (dtype, shape, start, end) in entries.items():
        start, end = data_start + start, data_start + end
        raw = data[start:end] if start % dtype.itemsize == 0 else data[start:end].clone()
        out[name] = raw.view(dtype).reshape(shape)
    return out


def safetensors_header(path: str) -> tuple[dict, int]:
    """({name: (dtype, shape, start, end)}, where the data starts) of a safetensors file, as the
    safetensors library checks it: a header length within the file, a JSON object, known dtypes,
    shapes that fill their byte ranges exactly, and ranges that tile the data in order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise not_safetensors(path, f"its header length {n:,} does not fit a {size:,}-byte file")
        if n > MAX_HEADER:
            raise not_safetensors(path, f"its header length {n:,} is over the {MAX_HEADER:,}-byte limit")
        try:
            header = json_value(f.read(n))
        except ValueError as e:
            raise not_safetensors(path, f"its header is {e}") from None
    if not isinstance(header, dict):
        raise not_safetensors(path, f"its header is {json_kind(header)}, not a JSON object")
    data_size = size - 8 - n
    entries = {name: tensor_entry(path, name, info, data_size) for name, info in header.items()
               if name != "__metadata__"}
    at = 0  # each tensor starts where the one before it ends: no overlap, no gap
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start != at:
            raise not_safetensors(path, f"tensor {shown(name)} starts at byte {start:,} of the data, "
                                  f"not at {at:,} where the tensor before it ends")
        at = end
    if at != data_size:
        raise not_safetensors(path, f"its tensors end at byte {at:,} of the data, not at its end ({data_size:,})")
    return entries, 8 + n


def tensor_entry(path: str, name: str, info, data_size: int) -> tuple:
    """(dtype, shape, start, end) of one header entry, or a ConvertError naming the field."""
    whole = lambda v: type(v) is int  # JSON true/false are not sizes
    info = info if isinstance(info, dict) else {}
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    where = f"tensor {shown(name)}"
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise not_safetensors(path, f"{where} has dtype {shown(dtype)}, not one danlu reads ({', '.join(ST_DTYPES)})")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(whole(d) and 0 <= d < 2**63 for d in shape)):
        raise not_safetensors(path, f"{where} has shape {shown(shape)}, not a list of at most {MAX_DIMS} sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(whole, offsets))
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise not_safetensors(path, f"{where} has data_offsets {shown(offsets)}, not a [start, end] range "
                              f"within the file's {data_size:,} data bytes")
    nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise not_safetensors(path, f"{where} of shape {shape} and dtype {dtype} needs {nbytes:,} bytes, "
                              f"but its data_offsets span {offsets[1] - offsets[0]:,}")
    return ST_DTYPES[dtype], shape, offsets[0], offsets[1]


def not_safetensors(path: str, why: str) -> ConvertError:
    return ConvertError(f"{path}: not a readable safetensors file ({why}); download it again")


def write_safetensors(path: str, tensors: dict[str, Tensor], metadata: dict | None = None) -> None:
    """Write tensors (in name order) atomically; transformers' loader wants format=pt."""
    names = sorted(tensors)
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    dtype_name = {v: k for k, v in ST_DTYPES.items()}
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_name[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


# ----------------------------------------------------------------------------- a stranger's folder

def folder_file(folder: str, name: str, named_by: str = "") -> str:
    """The path of file `name` of a Hugging Face folder, checked before it is opened: it must
    stay inside the folder (no absolute name, no .., no symlink pointing out; huggingface_hub's
    cache, whose snapshot files link to ../../blobs, counts as inside) and be a regular file (a
    FIFO or a device would block or never end)."""
    path = os.path.join(folder, name)
    source = f" ({named_by} names it)" if named_by else ""
    try:
        real = os.path.realpath(path)
    except (ValueError, OSError) as e:  # a NUL byte in the name, a symlink loop
        raise ConvertError(f"{path}{source}: not a usable file name ({one_line(e)}); "
                           "download the model again") from None
    if not any(os.path.commonpath([real, root]) == root for root in folder_roots(folder)):
        raise ConvertError(f"{path}{source}: leaves the folder (it resolves to {real}); danlu reads only "
                           f"files inside {folder}: copy the file in")
    if not os.path.exists(real):
        raise ConvertError(f"{path}{source}: no such file; download the model again")
    if not os.path.isfile(real) or not os.access(real, os.R_OK):
        raise ConvertError(f"{path}{source}: not a readable regular file; download the model again")
    return path


def folder_roots(folder: str) -> list[str]:
    real = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":  # huggingface_hub's cache: models--x/snapshots/<rev>
        return [real, os.path.join(os.path.dirname(parent), "blobs")]
    return [real]


def read_small_file(path: str) -> bytes:
    """The bytes of a (folder_file-checked) JSON or text file (tokenizer.small_file's limits)."""
    try:
        return small_file(path)
    except ValueError as e:
        raise ConvertError(f"{path} {e}; download it again") from None


def read_json(path: str) -> dict:
    """The JSON object in a (folder_file-checked) file, or a ConvertError naming the file."""
    try:
        value = json_value(read_small_file(path))
    except ValueError as e:
        raise ConvertError(f"{path}: {e}; download it again") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: {json_kind(value)}, not a JSON object; download it again")
    return value


def read_folder_weights(folder: str) -> dict[str, Tensor]:
    """model.safetensors, or every shard named by model.safetensors.index.json."""
    single, index = (os.path.join(folder, n) for n in ("model.safetensors", "model.safetensors.index.json"))
    if os.path.lexists(single):
        return read_safetensors(folder_file(folder, "model.safetensors"))
    if not os.path.lexists(index):
        raise ConvertError(f"{folder}: no model.safetensors or model.safetensors.index.json; danlu "
                           "reads safetensors weights only (save the model with safe_serialization=True)")
    weight_map = read_json(folder_file(folder, "model.safetensors.index.json")).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: weight_map is {json_kind(weight_map) if weight_map is not None else 'missing'}"
                           ", not an object of tensor name -> shard file name; download it again")
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise ConvertError(f"{index}: weight_map names the shard {shown(bad[0])}, not a file name; download it again")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_safetensors(folder_file(folder, shard, "model.safetensors.index.json")))
    return tensors


# ----------------------------------------------------------------------------- GPT-2 <-> danlu

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def unsupported(where: str, key: str, value, fix: str) -> ConvertError:
    return ConvertError(f"{where}: {key} = {shown(value)} is not supported; {fix}")


def gpt2_from_hf(hf: dict, tensors: dict, where: str) -> tuple[GPTConfig, dict]:
    """GPT2LMHeadModel -> danlu. The names are GPT-2's own; its Conv1D stores (in, out)."""
    act = hf.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
    if mlp is None:
        raise unsupported(where, "activation_function", act, "danlu has gelu and gelu_new (tanh)")
    for key, usual in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if hf.get(key, usual) != usual:
            raise unsupported(where, key, hf[key], f"danlu's attention has {key} = {usual}")
    C, eps = hf["n_embd"], hf.get("layer_norm_epsilon", 1e-5)
    hidden = hf.get("n_inner") or 4 * C
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=C, mlp=mlp, mlp_hidden=0 if hidden == 4 * C else hidden,
                       norm_eps=0.0 if eps == 1e-5 else eps, dropout=0.0,
                       tie_embeddings=hf.get("tie_word_embeddings", True))
    state = {}
    for key, t in tensors.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old saves keep the causal mask as a buffer
        conv1d = name.endswith(CONV1D) and t.dim() == 2  # any other shape is reported by check_state
        state[name if name == "lm_head.weight" else "transformer." + name] = t.t() if conv1d else t
    if config.tie_embeddings:
        state["lm_head.weight"] = state.get("transformer.wte.weight")
    return config, state


def gpt2_to_hf(config: GPTConfig, state: dict) -> tuple[dict, dict]:
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
          "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
          "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.mlp_hidden or None,
          "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
          "layer_norm_epsilon": config.norm_eps or 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
          "attn_pdrop": 0.0, "scale_attn_weights": True, "tie_word_embeddings": config.tie_embeddings}
    tensors = {}
    for key, t in state.items():
        if key == "lm_head.weight":
            if not config.tie_embeddings:
                tensors[key] = t
            continue
        name = key.removeprefix("transformer.")
        tensors["transformer." + name] = t.t() if name.endswith(CONV1D) else t
    return hf, tensors


# ----------------------------------------------------------------------------- Llama <-> danlu

LLAMA_LAYER = {"input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
               "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
               "mlp.down_proj.weight": "mlp.c_proj.weight", "mlp.down_proj.bias": "mlp.c_proj.bias"}
FUSED = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj")}  # danlu's swiglu: gate first, then value


def swiglu_default_hidden(n_embd: int) -> int:
    return 64 * math.ceil(8 * n_embd / 3 / 64)  # model.MLP's width when mlp_hidden = 0


def llama_from_hf(hf: dict, tensors: dict, where: str) -> tuple[GPTConfig, dict]:
    """LlamaForCausalLM / Qwen2ForCausalLM -> danlu: rope + rmsnorm + swiglu, q|k|v and gate|up
    fused into one matrix each."""
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nh
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    checks = [("hidden_act", hf.get("hidden_act", "silu"), "silu", "danlu's swiglu uses silu"),
              ("head_dim", hf.get("head_dim") or C // nh, C // nh, "danlu's head size is hidden_size / heads"),
              ("rope_scaling", scaling or None, None, "danlu's rope has no scaling (a Llama 3.1+ feature)"),
              ("use_sliding_window", hf.get("use_sliding_window", False), False, "danlu attends to the whole context")]
    for key, value, usual, why in checks:
        if value != usual:
            raise unsupported(where, key, value, why)
    qwen2 = hf.get("model_type") == "qwen2"
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    eps, hidden = hf.get("rms_norm_eps", 1e-6), hf["intermediate_size"]
    config = GPTConfig(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                       n_layer=hf["num_hidden_layers"], n_head=nh, n_embd=C, n_kv_head=0 if nkv == nh else nkv,
                       mlp_hidden=0 if hidden == swiglu_default_hidden(C) else hidden,
                       pos_emb="rope", rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                       norm="rmsnorm", norm_eps=0.0 if eps == 1e-6 else eps, mlp="swiglu", dropout=0.0,
                       bias=attn_bias or mlp_bias, qkv_bias=qwen2 and not (attn_bias or mlp_bias),
                       tie_embeddings=hf.get("tie_word_embeddings", False))
    t = {k.removeprefix("model."): v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    state = {"transformer.wte.weight": t.pop("embed_tokens.weight", None),
             "transformer.ln_f.weight": t.pop("norm.weight", None)}
    state["lm_head.weight"] = state["transformer.wte.weight"] if config.tie_embeddings else t.pop("lm_head.weight", None)
    for i in range(config.n_layer):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for hf_name, name in LLAMA_LAYER.items():
            if p + hf_name in t:
                state[q + name] = t.pop(p + hf_name)
        for name, parts in FUSED.items():
            for kind in ("weight", "bias"):
                found = [t.pop(f"{p}{part}.{kind}") for part in parts if f"{p}{part}.{kind}" in t]
                if len(found) == len(parts):
                    state[f"{q}{name}.{kind}"] = fuse(found, f"{p}{{{','.join(parts)}}}.{kind}", where)
                elif found:
                    state[f"{q}{name}.{kind}"] = None
    state.update(t)  # anything left over is reported by check_state
    return config, fill_zero_biases(config, state)


def fuse(parts: list[Tensor], name: str, where: str) -> Tensor:
    """q|k|v or gate|up stacked into danlu's one matrix; their widths must agree to stack."""
    if parts[0].dim() == 0 or len({p.shape[1:] for p in parts}) > 1:
        raise ConvertError(f"{where}: the weights' parts of {name} have shapes {[tuple(p.shape) for p in parts]}, "
                           "which do not stack; config.json and the weights disagree")
    return torch.cat(parts)


def fill_zero_biases(config: GPTConfig, state: dict) -> dict:
    """With bias on, a bias the source does not have (Llama's attention_bias without mlp_bias,
    or the reverse) is zero: the same function, in danlu's all-or-nothing bias switch."""
    if config.bias:
        with torch.device("meta"):
            want = GPT(config).state_dict()
        for key, ref in want.items():
            if key.endswith(".bias") and state.get(key) is None:
                state[key] = torch.zeros(ref.shape)
    return state


def llama_to_hf(config: GPTConfig, state: dict) -> tuple[dict, dict]:
    """danlu -> LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v-only biases (Llama's
    attention_bias would add one on o_proj too)."""
    qwen2 = config.qkv_bias and not config.bias
    C, nh = config.n_embd, config.n_head
    hs, nkv = C // nh, config.n_kv_head or nh
    hf = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
          "model_type": "qwen2" if qwen2 else "llama", "vocab_size": config.vocab_size, "hidden_size": C,
          "intermediate_size": config.mlp_hidden or swiglu_default_hidden(C),
          "num_hidden_layers": config.n_layer, "num_attention_heads": nh, "num_key_value_heads": nkv,
          "head_dim": hs, "hidden_act": "silu", "max_position_embeddings": config.block_size,
          "rms_norm_eps": config.norm_eps or 1e-6, "rope_theta": config.rope_theta, "rope_scaling": None,
          "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
          "attention_dropout": 0.0, "tie_word_embeddings": config.tie_embeddings}
    if qwen2:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    else:
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    tensors = {"model.embed_tokens.weight": state["transformer.wte.weight"],
               "model.norm.weight": state["transformer.ln_f.weight"]}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    sizes = {"attn.c_attn": [nh * hs, nkv * hs, nkv * hs], "mlp.c_fc": None}
    for i in range(config.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for hf_name, name in LLAMA_LAYER.items():
            if q + name in state:
                tensors[p + hf_name] = state[q + name]
        for name, parts in FUSED.items():
            for kind in ("weight", "bias"):
                if q + f"{name}.{kind}" in state:
                    whole = state[q + f"{name}.{kind}"]
                    pieces = whole.split(sizes[name]) if sizes[name] else whole.chunk(2)
                    tensors.update({f"{p}{part}.{kind}": x for part, x in zip(parts, pieces)})
    return hf, tensors


def check_state(config: GPTConfig, state: dict, where: str) -> None:
    """Every tensor the danlu model needs is there with its shape, and nothing else is."""
    with torch.device("meta"):
        want = GPT(config).state_dict()
    missing = [k for k in want if state.get(k) is None]
    extra = [k for k in state if k not in want]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})" for k in want
             if state.get(k) is not None and state[k].shape != want[k].shape]
    for problem, keys in (("lacks", missing), ("has unexpected", extra), ("has misshapen", wrong)):
        if keys:
            raise ConvertError(f"{where}: the weights {problem} tensors {keys[:4]}"
                               f"{' ...' if len(keys) > 4 else ''}; config.json and the weights disagree")


# ----------------------------------------------------------------------------- tokenizers

def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1
    bytes stand for themselves, the other 68 take the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def split_pattern(pre: dict | None, where: str) -> str:
    """The one regex that splits text as tokenizer.json's pre-tokenizer does, for the three
    byte-level layouts in use: ByteLevel alone (GPT-2), Split(regex) + ByteLevel (Qwen2,
    Llama 3), Digits + ByteLevel (SmolLM2)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space"):
        raise unsupported(where, "pre_tokenizer ByteLevel add_prefix_space", True, "danlu adds no prefix space")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    regex = steps[0].get("pattern") if kinds == ["Split", "ByteLevel"] else None
    regex = regex.get("Regex") if isinstance(regex, dict) else None
    if isinstance(regex, str) and steps[0].get("behavior") == "Isolated":
        problem = pattern_problem(regex, PROBE_TEXT)  # a stranger's regex: tiktoken must run it
        if problem:
            raise ConvertError(f"{where}: pre_tokenizer Split: {problem}; danlu cannot split text with it")
        return regex
    if kinds == ["Digits", "ByteLevel"] and steps[1].get("use_regex", True):
        # digits are cut out before GPT-2's regex runs: a digit (or digit run) is its own piece,
        # and whitespace before a digit ends its piece there
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return GPT2_PATTERN.replace(r" ?\p{N}+", digits).replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])")
    raise unsupported(where, "pre_tokenizer", kinds or None,
                      "danlu reads byte-level BPE (GPT-2, SmolLM2, Qwen2 families)")


def bpe_meta(tj: dict, where: str) -> dict:
    """tokenizer.json (byte-level BPE) -> a `bpe` meta.json: token bytes by id, split pattern,
    special tokens. tiktoken merges by the rank of the merged token, so each merge must make a
    token whose id is above the ids of all earlier merges (true of BPE tables as trained)."""
    from tokenizer import BPETokenizer
    model = tj.get("model") or {}
    decoder = (tj.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise not_byte_level_bpe(where, f"a {shown(model.get('type'))} tokenizer with a {shown(decoder)} decoder")
    norm = (tj.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC", "NFD", "NFKC", "NFKD"):
        raise unsupported(where, "normalizer", norm, "danlu applies NFC/NFD/NFKC/NFKD only")
    specials, added = {}, {}
    for t in tj.get("added_tokens") or []:
        if not t["special"] and (t.get("lstrip") or t.get("rstrip") or t.get("single_word")):
            raise unsupported(where, f"added token {shown(t['content'])} lstrip/rstrip/single_word", True,
                              "danlu matches added tokens as plain strings")
        (specials if t["special"] else added)[t["content"]] = t["id"]
    byte_of = {c: b for b, c in byte_alphabet().items()}
    vocab = model["vocab"]
    table = [None] * (max([*vocab.values(), *specials.values(), *added.values()]) + 1)
    reserved = set(specials.values()) | set(added.values())
    for text, i in vocab.items():
        if i not in reserved:
            if any(c not in byte_of for c in text):
                raise ConvertError(f"{where}: token {shown(text)} (id {i}) is not byte-level; not a byte-level BPE")
            table[i] = bytes(byte_of[c] for c in text)
    present = set(table)
    missing = [b for b in range(256) if bytes([b]) not in present]
    if missing:
        raise ConvertError(f"{where}: the vocabulary lacks {len(missing)} of the 256 single bytes "
                           f"(e.g. {bytes(missing[:3])!r}); such text could not be encoded")
    last = -1
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if vocab.get(a + b, -1) <= last:
            raise ConvertError(f"{where}: merge {shown(a)} + {shown(b)} makes id {vocab.get(a + b)}, not above "
                               f"the previous merge's {last}; this table cannot run as tiktoken ranks")
        last = vocab[a + b]
    tok = BPETokenizer(table, split_pattern(tj.get("pre_tokenizer"), where), specials, norm, added)
    return tok.to_meta()


def char_or_vocab_meta(tj: dict, where: str) -> dict | None:
    """The two layouts export.py writes for danlu's char and vocab kinds, read back as those
    kinds (single characters: BPE without merges or pre-tokenizer; words: WordLevel), else None."""
    from tokenizer import CharTokenizer, VocabTokenizer
    model, specials = tj.get("model") or {}, {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
    by_id = sorted(model.get("vocab", {}).items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        return None
    if model.get("type") == "BPE" and not model.get("merges") and not tj.get("pre_tokenizer") \
            and (tj.get("decoder") or {}).get("type") == "Fuse" and all(len(t) == 1 for t, _ in by_id):
        return CharTokenizer([t for t, _ in by_id], specials).to_meta()
    if model.get("type") == "WordLevel" and (tj.get("pre_tokenizer") or {}).get("type") == "WhitespaceSplit":
        unk = model.get("unk_token") or None
        if unk is not None and unk not in model["vocab"]:
            raise ConvertError(f"{where}: model.unk_token {shown(unk)} is not in model.vocab; download it again")
        return VocabTokenizer([t for t, _ in by_id], specials, unk).to_meta()
    return None


def verify_tokenizer(meta: dict, tokenizer_json: str) -> None:
    """When the `tokenizers` library is installed, the converted tokenizer must give the ids the
    original gives on a mixed probe text (English, Chinese, emoji, digits, whitespace)."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        return
    from tokenizer import from_meta
    try:
        want = HFTokenizer.from_file(tokenizer_json).encode(PROBE_TEXT, add_special_tokens=False).ids
    except Exception as e:  # the library's own refusal of a file it cannot load
        raise ConvertError(f"{tokenizer_json}: the tokenizers library cannot load it ({one_line(e)}); "
                           "download the model's tokenizer.json again") from None
    got = from_meta(meta).encode(PROBE_TEXT)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ConvertError(f"{tokenizer_json}: the converted tokenizer disagrees with the original at "
                           f"token {at} of a probe text ({got[at:at + 3]} vs {want[at:at + 3]})")


def gpt2_meta_if_same(meta: dict) -> dict:
    """GPT-2's own table as tiktoken's gpt2 encoding (a small meta.json, the same ids); any
    other table, or no tiktoken cache to compare with, stays a `bpe` meta."""
    if meta.get("pattern") != GPT2_PATTERN or meta["special_tokens"] != {"<|endoftext|>": 50256} \
            or meta.get("normalization") or meta.get("added_tokens") or len(meta["tokens_b64"]) != 50257:
        return meta
    from tokenizer import from_meta
    try:
        gpt2 = TiktokenTokenizer("gpt2")
    except RuntimeError:
        return meta
    mine = from_meta(meta).token_bytes
    same = all(mine[i] == gpt2.enc.decode_single_token_bytes(i) for i in range(50256))
    return gpt2.to_meta() if same else meta


def named_specials(folder: str, specials: dict) -> dict:
    """bos_token / eos_token of the folder's tokenizer_config.json, when they are special tokens
    (kept in meta.json so that an export writes them back)."""
    if not os.path.lexists(os.path.join(folder, "tokenizer_config.json")):
        return {}
    config = read_json(folder_file(folder, "tokenizer_config.json"))
    out = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in specials:
            out[key] = value
    return out


# the files a tokenizer may come in, for saying what a folder holds instead of tokenizer.json
OTHER_TOKENIZERS = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer_config.json")


def folder_tokenizer(folder: str, hf: dict) -> dict:
    """The tokenizer meta of a Hugging Face folder: tokenizer.json, else GPT-2's vocab.json +
    merges.txt, else (a GPT-2 folder holding weights only, with GPT-2's 50,257 ids) tiktoken's
    gpt2. Any other folder is an error: no other tokenizer is ever used in its place."""
    path = os.path.join(folder, "tokenizer.json")
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    hf = hf if isinstance(hf, dict) else {}
    if os.path.lexists(path):
        tj = read_json(folder_file(folder, "tokenizer.json"))
        check_tokenizer_json(tj, path)
        meta = char_or_vocab_meta(tj, path)
        if meta is not None:
            return meta
        meta = bpe_meta(tj, path)
        verify_tokenizer(meta, path)
        meta.update(named_specials(folder, meta["special_tokens"]))
    elif os.path.lexists(vocab) and os.path.lexists(merges):
        tj = vocab_merges_json(folder)
        check_tokenizer_json(tj, vocab)
        meta = bpe_meta(tj, vocab)
    elif hf.get("model_type") == "gpt2" and hf.get("vocab_size") == 50257:
        return TiktokenTokenizer("gpt2").to_meta()
    else:
        found = [n for n in OTHER_TOKENIZERS if os.path.lexists(os.path.join(folder, n))]
        raise ConvertError(f"{folder}: no tokenizer.json (found {', '.join(found) or 'no tokenizer file'}); danlu "
                           "reads a byte-level BPE tokenizer.json (or GPT-2's vocab.json + merges.txt): copy the "
                           "model's tokenizer.json into the folder")
    return gpt2_meta_if_same(meta)


def vocab_merges_json(folder: str) -> dict:
    """GPT-2's older vocab.json + merges.txt, as the tokenizer.json they amount to."""
    table = read_json(folder_file(folder, "vocab.json"))
    path = folder_file(folder, "merges.txt")
    try:
        lines = read_small_file(path).decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (byte {e.start}); download it again") from None
    pairs = [line for line in lines if line.strip() and not line.startswith("#version")]
    eot = {"<|endoftext|>": table["<|endoftext|>"]} if "<|endoftext|>" in table else {}
    return {"model": {"type": "BPE", "vocab": table, "merges": pairs}, "decoder": {"type": "ByteLevel"},
            "pre_tokenizer": {"type": "ByteLevel"},
            "added_tokens": [{"content": k, "id": v, "special": True} for k, v in eot.items()]}


def check_tokenizer_json(tj: dict, where: str) -> None:
    """The parts of tokenizer.json danlu reads have their JSON kinds, and its ids stay near its
    entry count (the table danlu builds has one slot per id), so a hostile file fails here,
    naming the field; a model that is not BPE is named with what danlu reads instead."""
    def need(ok: bool, field: str, wanted: str):
        if not ok:
            raise ConvertError(f"{where}: {field} is not {wanted}; download it again")

    model = tj.get("model")
    need(isinstance(model, dict) and isinstance(model.get("type"), str), "model", "an object with a type")
    if model["type"] not in ("BPE", "WordLevel"):
        raise not_byte_level_bpe(where, f"a {shown(model['type'])} model")
    vocab, merges, added = model.get("vocab"), model.get("merges") or [], tj.get("added_tokens") or []
    need(isinstance(vocab, dict) and all(type(i) is int and i >= 0 for i in vocab.values()),
         "model.vocab", "an object of token -> id (a whole number from 0)")
    need(isinstance(merges, list) and all(is_merge(m) for m in merges), "model.merges",
         'a list of merges ("a b" or ["a", "b"])')
    need(model.get("unk_token") is None or isinstance(model["unk_token"], str), "model.unk_token", "a string")
    need(isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                         and type(t.get("id")) is int and t["id"] >= 0
                                         and isinstance(t.get("special"), bool) for t in added),
         "added_tokens", "a list of {content, id, special} objects")
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        need(tj.get(part) is None or isinstance(tj[part], dict), part, "an object")
    steps = (tj.get("pre_tokenizer") or {}).get("pretokenizers", [])
    need(isinstance(steps, list) and all(isinstance(x, dict) for x in steps), "pre_tokenizer.pretokenizers",
         "a list of objects")
    entries = len(vocab) + len(added)
    top = max([*vocab.values(), *(t["id"] for t in added)], default=0)
    need(top < 2 * entries + 256, f"id {top:,}", f"near its {entries:,} entries (holes are allowed, "
         "but every id takes a slot in danlu's table)")


def is_merge(m) -> bool:
    if isinstance(m, str):
        return " " in m
    return isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)


def not_byte_level_bpe(where: str, found: str) -> ConvertError:
    return ConvertError(f"{where}: {found} is not a byte-level BPE (SentencePiece-style tables, as in Llama 2 or "
                        "TinyLlama, are not converted); danlu reads GPT-2, SmolLM2 and Qwen2-family tokenizers")


def check_fits_uint16(meta: dict, source: str) -> None:
    """Training data is uint16 ids: a larger vocabulary is an error, never a truncation."""
    if meta["vocab_size"] >= UINT16_LIMIT:
        raise ConvertError(f"{source}: its tokenizer has {meta['vocab_size']:,} ids, more than the 65,535 "
                           f"that danlu's uint16 .bin files hold, so it cannot prepare data or train on it "
                           f"(sample.py --out_dir={source} still works). {FITS_UINT16}.")


def token_table(meta: dict) -> tuple[list, str]:
    """(token bytes by id, split pattern) of a tiktoken or bpe meta."""
    from tokenizer import from_meta
    tok = from_meta(meta)
    if meta["kind"] == "bpe":
        return tok.token_bytes, tok.pattern
    specials = set(tok.special_tokens.values())
    table = [None if i in specials else tok.enc.decode_single_token_bytes(i) for i in range(tok.enc.n_vocab)]
    # tiktoken spells GPT-2's regex with possessive quantifiers; write the form GPT-2's files use
    return table, GPT2_PATTERN if tok.encoding == "gpt2" else tok.enc._pat_str


def recover_merges(table: list) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order: run BPE on the token's bytes
    with only lower-ranked tokens; the two parts left are the merge (how tiktoken tables are
    written as Hugging Face merges)."""
    rank = {b: i for i, b in enumerate(table) if b is not None}
    merges = []
    for i, token in enumerate(table):
        if token is None or len(token) < 2:
            continue
        parts = [token[j:j + 1] for j in range(len(token))]
        while len(parts) > 2:
            pairs = [rank.get(parts[j] + parts[j + 1], i) for j in range(len(parts) - 1)]
            j = min(range(len(pairs)), key=pairs.__getitem__)
            if pairs[j] >= i:
                break
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2:
            raise ConvertError(f"token {i} ({token!r}) is not a merge of two lower-ranked tokens; "
                               "this table cannot be written as Hugging Face merges")
        merges.append((parts[0], parts[1]))
    return merges


def added_token(content: str, i: int, special: bool = True) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def tokenizer_json(meta: dict) -> dict:
    """A tokenizer.json the `tokenizers` library loads and encodes as danlu does: byte-level BPE
    for tiktoken/bpe, single characters for char, whitespace-separated words for vocab."""
    specials = meta.get("special_tokens", {})
    added = [added_token(k, v) for k, v in sorted(specials.items(), key=lambda kv: kv[1])]
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": None, "post_processor": None, "decoder": None}
    if meta["kind"] == "char":
        # no pre-tokenizer: BPE without merges reads one character per token, and drops the
        # characters it lacks, as danlu's char tokenizer does
        vocab = {c: i for i, c in enumerate(meta["chars"])}
        tj["model"] = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                       "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                       "ignore_merges": False, "vocab": vocab, "merges": []}
        tj["decoder"] = {"type": "Fuse"}
    elif meta["kind"] == "vocab":
        tj["model"] = {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(meta["tokens"])},
                       "unk_token": meta.get("unk_token") or ""}
        tj["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    else:
        table, pattern = token_table(meta)
        char = byte_alphabet()
        text = lambda b: "".join(char[x] for x in b)
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]}
        tj["decoder"] = byte_level
        if meta.get("normalization"):
            tj["normalizer"] = {"type": meta["normalization"]}
        tj["added_tokens"] += [added_token(k, v, special=False) for k, v in (meta.get("added_tokens") or {}).items()]
        # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does
        tj["model"] = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                       "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                       "ignore_merges": True, "vocab": {text(b): i for i, b in enumerate(table) if b is not None},
                       "merges": [f"{text(a)} {text(b)}" for a, b in recover_merges(table)]}
    return tj


def end_token(meta: dict) -> str | None:
    """The token that ends generation: end-of-turn for a chat model, else the document end."""
    specials = meta.get("special_tokens", {})
    for name in (END_OF_TURN, "<|endoftext|>", meta.get("eos_token"), "<EOS>", "</s>", "<|im_end|>"):
        if name in specials:
            return name
    return None


def tokenizer_files(meta: dict, block_size: int) -> dict:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (name -> JSON object)."""
    specials, eos = meta.get("special_tokens", {}), end_token(meta)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}
    named = {"eos_token": eos, "unk_token": meta.get("unk_token"), "bos_token": meta.get("bos_token")}
    named = {k: v for k, v in named.items() if v}
    config.update(named)
    if all(t in specials for t in CHAT_TOKENS):  # the template sample.py --chat and SFT use
        config["chat_template"] = chat_template_jinja()
    return {"tokenizer.json": tokenizer_json(meta), "tokenizer_config.json": config,
            "special_tokens_map.json": named}


# ----------------------------------------------------------------------------- loading a source

def download_gpt2(name: str) -> str:
    """The local folder of one of OpenAI's GPT-2 sizes: huggingface_hub's cache, or a download."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{name}: fetching GPT-2 needs huggingface_hub (pip install huggingface_hub); "
                           "offline, pass a local folder with config.json and model.safetensors") from None
    files = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
             "generation_config.json"]
    try:
        return snapshot_download(GPT2_NAMES[name], allow_patterns=files, local_files_only=True)
    except Exception:  # not cached yet
        pass
    try:
        return snapshot_download(GPT2_NAMES[name], allow_patterns=files)
    except Exception as e:
        why = " ".join(str(e).split())[:160]  # one line
        raise ConvertError(f"{name}: could not download {GPT2_NAMES[name]} ({type(e).__name__}: "
                           f"{why}); offline, pass a local folder with config.json and "
                           "model.safetensors instead") from None


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


# config.json fields danlu reads, and their JSON kinds; the first dict's must be present (the
# others may be absent or null, meaning the Hugging Face default). A size is a whole number from
# 1 to the count of numbers in the weights, a layer count from 1 to the layers the weights hold:
# a hostile value is refused before any model, even an empty one, is built.
GPT2_FIELDS = ({"n_layer": "layers", "n_embd": "size", "n_head": "size", "n_positions": "size", "vocab_size": "size"},
               {"n_inner": "size", "layer_norm_epsilon": "number", "activation_function": "text",
                "tie_word_embeddings": "bool"})
LLAMA_FIELDS = ({"num_hidden_layers": "layers", "hidden_size": "size", "num_attention_heads": "size",
                 "intermediate_size": "size", "max_position_embeddings": "size", "vocab_size": "size"},
                {"num_key_value_heads": "size", "head_dim": "size", "rms_norm_eps": "number", "rope_theta": "number",
                 "rope_parameters": "object", "rope_parameters.rope_theta": "number", "rope_scaling": "object",
                 "hidden_act": "text", "attention_bias": "bool", "mlp_bias": "bool", "use_sliding_window": "bool",
                 "tie_word_embeddings": "bool"})
FIELD_KINDS = {"size": (lambda v: type(v) is int, "a whole number"),
               "layers": (lambda v: type(v) is int, "a whole number"),
               "number": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a positive number"),
               "text": (lambda v: type(v) is str, "a string"),
               "bool": (lambda v: type(v) is bool, "true or false"),
               "object": (lambda v: type(v) is dict, "an object")}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers)\.(\d{1,9})\.")  # transformer.h.3. / model.layers.3.


def check_config(hf: dict, fields: tuple, tensors: dict, path: str) -> dict:
    """Every field of config.json that danlu reads has its JSON kind and a size the weights
    bound; else a ConvertError naming the field. Returns hf without its nulls, so that a null
    reads as the default, as in transformers."""
    required, optional = fields
    limits = {"size": (sum(t.numel() for t in tensors.values()), "numbers"),
              "layers": (len({m.group(1) for k in tensors if (m := LAYER_INDEX.search(k))}), "layers")}
    for key, kind in {**required, **optional}.items():
        value = config_field(hf, key)
        if value is None and key not in required:
            continue
        if value is None and key not in hf:
            raise ConvertError(f"{path}: {key} is missing; download the model's config.json again")
        ok, wanted = FIELD_KINDS[kind]
        if not ok(value):
            raise ConvertError(f"{path}: {key} = {shown(value)} is not {wanted}; "
                               "fix config.json or download it again")
        limit, unit = limits.get(kind, (None, ""))
        if limit is not None and not 1 <= value <= limit:
            raise ConvertError(f"{path}: {key} = {value:,} is outside 1..{limit:,} (the weights hold {limit:,} "
                               f"{unit}); config.json does not describe these weights")
    return {k: v for k, v in hf.items() if v is not None}


def config_field(hf: dict, key: str):
    """hf[key]; a dotted key walks into objects (None where one is missing)."""
    for part in key.split("."):
        hf = hf.get(part) if isinstance(hf, dict) else None
    return hf


def check_rope_size(config: GPTConfig, tensors: dict, path: str) -> None:
    """The rope tables (block_size x head size numbers) are the one thing a model allocates
    that the weights do not bound: no larger than the weights themselves."""
    numbers = sum(t.numel() for t in tensors.values())
    if config.pos_emb == "rope" and config.block_size * (config.n_embd // config.n_head) > numbers:
        raise ConvertError(f"{path}: max_position_embeddings = {config.block_size:,} needs rope tables larger "
                           f"than the weights ({numbers:,} numbers); lower it to the context you will use")


def hf_checkpoint(folder: str, source: str) -> dict:
    path = folder_file(folder, "config.json")
    hf = read_json(path)
    arch, kind = hf.get("architectures"), hf.get("model_type")
    arch = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else ""
    if kind == "gpt2":
        convert_fn, fields = gpt2_from_hf, GPT2_FIELDS
    elif kind in ("llama", "qwen2") or arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        convert_fn, fields = llama_from_hf, LLAMA_FIELDS
    else:
        raise ConvertError(f"{path}: model_type {shown(kind)} ({shown(arch)}) is not one danlu imports; it reads "
                           "GPT2LMHeadModel, LlamaForCausalLM and Qwen2ForCausalLM")
    tensors = read_folder_weights(folder)
    if not tensors:
        raise ConvertError(f"{folder}: its weights hold no tensors; download the model again")
    hf = check_config(hf, fields, tensors, path)
    try:
        config, state = convert_fn(hf, tensors, path)
    except ConfigError as e:  # sizes that do not fit together (heads that do not divide the width)
        raise ConvertError(f"{path}: {e}; config.json does not describe a model danlu can build") from None
    check_rope_size(config, tensors, path)
    check_state(config, state, folder)
    meta = folder_tokenizer(folder, hf)
    if meta["vocab_size"] > config.vocab_size:
        raise ConvertError(f"{folder}: its tokenizer has {meta['vocab_size']:,} ids but config.json's vocab_size "
                           f"is {config.vocab_size:,}; the ids past it have no embedding (another model's "
                           "tokenizer?)")
    meta["source"] = {"converted_from": source, "architecture": arch or kind}
    return {"model": state, "model_config": dataclasses.asdict(config), "tokenizer": meta,
            "train_config": {"init_from": source}, "iter_num": 0}


def hf_architecture(config: GPTConfig, where: str) -> str:
    """The Hugging Face class that computes exactly what config does: GPT2LMHeadModel for the
    GPT-2 layout, LlamaForCausalLM for rope + rmsnorm + swiglu (Qwen2ForCausalLM with q/k/v-only
    biases), or a ConvertError naming the switch that none of them has."""
    for key, value, ok in (("qk_norm", config.qk_norm, False), ("logit_softcap", config.logit_softcap, 0.0),
                           ("cls_head", config.cls_head, "lm")):
        if value != ok:
            raise unsupported(where, key, value, "neither GPT2LMHeadModel nor LlamaForCausalLM has it (QK-norm "
                              "is Qwen3's, which danlu does not write yet); use --format=onnx, or train without it")
    layouts = {"learned": ("GPT-2", {"norm": ("layernorm",), "mlp": ("gelu", "gelu_tanh")}),
               "rope": ("Llama", {"norm": ("rmsnorm",), "mlp": ("swiglu",)})}
    name, needs = layouts[config.pos_emb]
    for key, allowed in needs.items():
        if getattr(config, key) not in allowed:
            raise unsupported(where, key, getattr(config, key), f"with pos_emb={config.pos_emb!r} the "
                              f"{name} layout needs {key}={'|'.join(allowed)}; use --format=onnx")
    if name == "Llama":
        return "Qwen2ForCausalLM" if config.qkv_bias and not config.bias else "LlamaForCausalLM"
    if config.n_kv_head not in (0, config.n_head):
        raise unsupported(where, "n_kv_head", config.n_kv_head, "GPT-2 has no grouped-query attention "
                          "(rope + rmsnorm + swiglu models export as Llama)")
    return "GPT2LMHeadModel"


def save_hf(config: GPTConfig, state: dict, meta: dict, dest: str, card: str = "", where: str = "") -> str:
    """Write a Hugging Face folder (config.json, model.safetensors, generation_config.json,
    tokenizer files, README.md); return the architecture written."""
    gpt2 = hf_architecture(config, where or dest) == "GPT2LMHeadModel"
    state = {k: v.float() for k, v in state.items()}
    if gpt2:  # GPT-2 always has biases: a bias-free model writes zeros there
        state = fill_zero_biases(dataclasses.replace(config, bias=True), state)
    hf, tensors = (gpt2_to_hf if gpt2 else llama_to_hf)(config, state)
    specials = meta.get("special_tokens", {})
    eos = end_token(meta)
    bos = meta.get("bos_token") or ("<|endoftext|>" if eos == "<|endoftext|>" else None)
    # written even when null: left out, transformers' GPT-2 config would claim its own 50256
    ids = {"eos_token_id": specials.get(eos), "bos_token_id": specials.get(bos)}
    hf.update(ids, torch_dtype="float32", use_cache=True, initializer_range=0.02)
    files = {"config.json": hf, "generation_config.json": {**ids, "pad_token_id": ids.get("eos_token_id")},
             **tokenizer_files(meta, config.block_size)}
    os.makedirs(dest, exist_ok=True)
    write_safetensors(os.path.join(dest, "model.safetensors"), tensors)
    for name, obj in files.items():
        with atomic_write(os.path.join(dest, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
    if card:
        with atomic_write(os.path.join(dest, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
    return hf["architectures"][0]
