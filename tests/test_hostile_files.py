"""A Hugging Face folder is input from strangers: every corrupt, lying or hostile file in it is one
line of ConvertError naming the file and the field, before anything large is allocated, and no
file outside the folder is ever opened. Each test saves a tiny model with danlu's own exporter
(no transformers needed), breaks one thing, and loads it through checkpoint.load_pretrained."""
import builtins
import json
import os
import shutil

import pytest
import torch

import checkpoint
import convert
import tokenizer
from convert import ConvertError
from model import GPT, GPTConfig
from tokenizer import BPETokenizer, CharTokenizer, MetaError

TABLE = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell"]
META = BPETokenizer(TABLE, convert.GPT2_PATTERN, {"<|endoftext|>": len(TABLE)}).to_meta()
LAYOUTS = {"llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
           "gpt2": dict(mlp="gelu_tanh")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny folder of each layout, saved once; each test works on a copy."""
    root = tmp_path_factory.mktemp("saved")
    for name, layout in LAYOUTS.items():
        torch.manual_seed(0)
        config = GPTConfig(block_size=16, vocab_size=META["vocab_size"], n_layer=2, n_head=2, n_embd=16, **layout)
        convert.save_hf(config, GPT(config).state_dict(), META, str(root / name))
    return root


@pytest.fixture
def llama(saved, tmp_path):
    return shutil.copytree(saved / "llama", tmp_path / "llama")


@pytest.fixture
def gpt2(saved, tmp_path):
    return shutil.copytree(saved / "gpt2", tmp_path / "gpt2")


def load(folder):
    return checkpoint.load_pretrained(str(folder))


def edit_json(path, change):
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)  # in place
    path.write_text(json.dumps(obj), encoding="utf-8")


def one_line_error(folder, match):
    with pytest.raises(ConvertError, match=match) as e:
        load(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_tiny_folders_load(llama, gpt2):
    assert load(llama)[0].pos_emb == "rope" and load(gpt2)[0].pos_emb == "learned"


# ----------------------------------------------------------------------------- safetensors header

def rewrite_header(path, change, length=None):
    """model.safetensors with its header JSON changed (and the length field, when given)."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = change(json.loads(blob[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + blob[8 + n:])


def by_offset(header) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def set_entry(field, value):
    """Change one field of the first tensor's entry."""
    def change(header):
        header[by_offset(header)[0]][field] = value
        return header
    return change


def swap_first_two(header):
    """The first two tensors of different sizes trade byte ranges: the header lists them out of
    order, each range still inside the file and the ranges still tiling it."""
    names = by_offset(header)
    a = names[0]
    b = next(k for k in names if header[k]["shape"] != header[a]["shape"])
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return header


def overlap(header):
    names = by_offset(header)
    header[names[1]]["data_offsets"] = [x - 4 for x in header[names[1]]["data_offsets"]]
    return header


HEADER_CASES = {  # name: (change to the header, length field or None, message)
    "length_beyond_file": (lambda h: h, 10**12, r"header length 1,000,000,000,000 does not fit"),
    "not_json": (lambda h: b"{not json" + b" " * 40, None, r"its header is not valid JSON"),
    "not_utf8": (lambda h: b'{"\xff\xfe": 1}', None, r"its header is not UTF-8"),
    "an_array": (lambda h: [h], None, r"its header is an array, not a JSON object"),
    "nested_too_deep": (lambda h: b"[" * 100_000 + b"]" * 100_000, None, r"nested too deep"),
    "entry_not_object": (lambda h: {**h, "x": 3}, None, r"tensor 'x' has dtype None"),
    "unknown_dtype": (set_entry("dtype", "F8_E4M3"), None, r"dtype 'F8_E4M3', not one danlu reads"),
    "shape_not_sizes": (set_entry("shape", ["16", 16]), None, r"has shape \['16', 16\]"),
    "negative_size": (set_entry("shape", [-1, 16]), None, r"has shape \[-1, 16\]"),
    "too_many_dims": (set_entry("shape", [1] * 100), None, r"not a list of at most 8 sizes"),
    "shape_vs_bytes": (set_entry("shape", [10**6, 10**6]), None,
                       r"needs 4,000,000,000,000 bytes, but its data_offsets span"),
    "offsets_reversed": (set_entry("data_offsets", [64, 0]), None, r"data_offsets \[64, 0\], not a \[start, end\]"),
    "offsets_outside_file": (set_entry("data_offsets", [0, 10**15]), None, r"within the file's .* data bytes"),
    "offsets_not_numbers": (set_entry("data_offsets", [0, True]), None, r"data_offsets \[0, True\]"),
    "offsets_overlap": (overlap, None, r"starts at byte .* not at .* where the tensor before it ends"),
    "offsets_out_of_order": (swap_first_two, None, r"needs [\d,]+ bytes, but its data_offsets span"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_safetensors_header_lies_are_named(llama, case):
    change, length, message = HEADER_CASES[case]
    rewrite_header(llama / "model.safetensors", change, length)
    one_line_error(llama, r"model\.safetensors: not a readable safetensors file \(.*" + message)


def test_safetensors_header_over_the_limit_is_refused_unread(llama, monkeypatch):
    monkeypatch.setattr(convert, "MAX_HEADER", 64)  # a 100 MB header needs no 100 MB test file
    one_line_error(llama, r"model\.safetensors: .*header length [\d,]+ is over the 64-byte limit")


def test_short_or_empty_safetensors_files(llama):
    for blob in (b"", b"\x01\x00", b"\x02\x00\x00\x00\x00\x00\x00\x00{]"):
        (llama / "model.safetensors").write_bytes(blob)
        one_line_error(llama, r"model\.safetensors: not a readable safetensors file")
    (llama / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    one_line_error(llama, r"its weights hold no tensors")


# ----------------------------------------------------------------------------- sharded weights

def shard(folder, names=("a.safetensors", "b.safetensors")):
    """Split model.safetensors into two shards and an index (the layout of large models)."""
    tensors = convert.read_safetensors(str(folder / "model.safetensors"))
    tensors = {k: v.clone() for k, v in tensors.items()}
    os.remove(folder / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i::len(names)]
        convert.write_safetensors(str(folder / name), {k: tensors[k] for k in part})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_a_sharded_folder_loads(llama):
    shard(llama)
    assert load(llama)[0].n_layer == 2


def point_shard_at(folder, target: str):
    """The index names target (a path string) for every tensor of shard b."""
    edit_json(folder / "model.safetensors.index.json",
              lambda ix: ix["weight_map"].update({k: target for k, v in ix["weight_map"].items()
                                                  if v == "b.safetensors"}))


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink", "symlinked_folder"])
def test_shards_outside_the_folder_are_never_opened(llama, tmp_path, monkeypatch, escape):
    shard(llama)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(llama / "b.safetensors", outside / "b.safetensors")  # readable: loading it would succeed
    if escape == "absolute":
        point_shard_at(llama, str(outside / "b.safetensors"))
    elif escape == "dotdot":
        point_shard_at(llama, "../outside/b.safetensors")
    elif escape == "symlink":
        os.remove(llama / "b.safetensors")
        os.symlink(outside / "b.safetensors", llama / "b.safetensors")
    else:
        os.symlink(outside, llama / "sub")
        point_shard_at(llama, "sub/b.safetensors")
    opened = []
    real_open, real_from_file = builtins.open, torch.from_file
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(torch, "from_file", lambda f, *a, **k: opened.append(str(f)) or real_from_file(f, *a, **k))
    one_line_error(llama, r"b\.safetensors \(model\.safetensors\.index\.json names it\): leaves the folder")
    assert opened and not [f for f in opened if os.path.realpath(f).startswith(str(outside))]


def test_index_problems_are_named(llama):
    weight_map = shard(llama)
    point_shard_at(llama, "c.safetensors")
    one_line_error(llama, r"c\.safetensors \(model\.safetensors\.index\.json names it\): no such file")
    for bad, message in (([1, 2], r"weight_map is an array, not an object"),
                         ("a.safetensors", r"weight_map is a string, not an object"),
                         ({**weight_map, "x": 5}, r"weight_map names the shard 5, not a file name"),
                         ({**weight_map, "x": None}, r"weight_map names the shard None"),
                         ({**weight_map, "x": "a\x00b"}, r"not a usable file name"),
                         ({**weight_map, "x": ""}, r"not a readable regular file")):
        edit_json(llama / "model.safetensors.index.json", lambda ix: ix.update(weight_map=bad))
        one_line_error(llama, message)
    (llama / "model.safetensors.index.json").write_bytes(b"\xff{")
    one_line_error(llama, r"model\.safetensors\.index\.json: not UTF-8")


def test_a_fifo_shard_is_refused_without_blocking(llama):
    """Opening a FIFO for reading waits for a writer forever; it is refused unopened."""
    shard(llama)
    os.remove(llama / "b.safetensors")
    os.mkfifo(llama / "b.safetensors")
    one_line_error(llama, r"b\.safetensors .*not a readable regular file")


def test_a_symlink_into_the_folder_is_fine(llama):
    os.rename(llama / "model.safetensors", llama / "weights.bin")
    os.symlink("weights.bin", llama / "model.safetensors")
    assert load(llama)[0].n_layer == 2


# ----------------------------------------------------------------------------- config.json

def updated(**values):
    return lambda config: config.update(values)


CONFIG_CASES = {  # llama layout: (change, message)
    "missing_key": (lambda c: c.pop("hidden_size"), r"hidden_size is missing"),
    "string_for_number": (updated(hidden_size="16"), r"hidden_size = '16' is not a whole number"),
    "float_for_size": (updated(num_attention_heads=2.0), r"num_attention_heads = 2\.0 is not a whole"),
    "bool_for_size": (updated(vocab_size=True), r"vocab_size = True is not a whole number"),
    "null_size": (updated(intermediate_size=None), r"intermediate_size = None is not a whole number"),
    "negative_size": (updated(hidden_size=-16), r"hidden_size = -16 is outside 1\.\."),
    "zero_layers": (updated(num_hidden_layers=0), r"num_hidden_layers = 0 is outside 1\.\.2 "),
    "absurd_layers": (updated(num_hidden_layers=10**9),
                      r"num_hidden_layers = 1,000,000,000 is outside 1\.\.2 \(the weights hold 2 layers\)"),
    "absurd_vocab": (updated(vocab_size=10**12),
                     r"vocab_size = 1,000,000,000,000 is outside 1\.\.[\d,]+ \(the weights hold [\d,]+ numbers\)"),
    "absurd_width": (updated(hidden_size=2**62), r"hidden_size = [\d,]+ is outside"),
    "absurd_context": (updated(max_position_embeddings=10_000),
                       r"max_position_embeddings = 10,000 needs rope tables larger than the weights"),
    "heads_do_not_divide": (updated(num_attention_heads=3, head_dim=None),
                            r"n_embd \(16\) must divide by n_head \(3\)"),
    "eps_as_string": (updated(rms_norm_eps="1e-6"), r"rms_norm_eps = '1e-6' is not a positive number"),
    "eps_zero": (updated(rms_norm_eps=0), r"rms_norm_eps = 0 is not a positive number"),
    "nan_theta": (updated(rope_theta=float("nan")), r"rope_theta = nan is not a positive number"),
    "nested_theta": (updated(rope_theta=None, rope_parameters={"rope_theta": "big"}),
                     r"rope_parameters\.rope_theta = 'big' is not a positive number"),
    "rope_parameters_list": (updated(rope_parameters=[1]), r"rope_parameters = \[1\] is not an object"),
    "bool_as_string": (updated(tie_word_embeddings="no"), r"tie_word_embeddings = 'no' is not true or false"),
    "act_as_list": (updated(hidden_act=["silu"]), r"hidden_act = \['silu'\] is not a string"),
    "architectures_garbled": (updated(architectures={"a": 1}, model_type=[1]),
                              r"model_type \[1\] \(''\) is not one danlu imports"),
    "huge_string": (updated(model_type="x" * 10**6, architectures=[]),
                    r"model_type 'xxxx.*\.\.\. \(.*\) is not one danlu imports"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_json_problems_name_the_field(llama, case):
    change, message = CONFIG_CASES[case]
    edit_json(llama / "config.json", change)
    text = one_line_error(llama, r"config\.json: " + message)
    assert len(text) < 1000


def test_null_optional_fields_read_as_their_defaults(llama):
    """transformers reads null as the default; so does danlu (rather than passing None on)."""
    edit_json(llama / "config.json", updated(rms_norm_eps=None, rope_theta=None, rope_parameters=None, head_dim=None))
    config = load(llama)[0]
    assert config.norm_eps == 0.0 and config.rope_theta == 10000.0


@pytest.mark.parametrize("case", ["missing_n_embd", "string_n_layer", "absurd_n_positions", "act_as_list"])
def test_gpt2_config_json_problems_name_the_field(gpt2, case):
    change, message = {
        "missing_n_embd": (lambda c: c.pop("n_embd"), r"n_embd is missing"),
        "string_n_layer": (updated(n_layer="2"), r"n_layer = '2' is not a whole number"),
        "absurd_n_positions": (updated(n_positions=10**15), r"n_positions = [\d,]+ is outside"),
        "act_as_list": (updated(activation_function=[]), r"activation_function = \[\] is not a string"),
    }[case]
    edit_json(gpt2 / "config.json", change)
    one_line_error(gpt2, r"config\.json: " + message)


@pytest.mark.parametrize("blob, message", [(b"[1, 2]", r"an array, not a JSON object"),
                                           (b"\xff\xfe{}", r"not UTF-8"), (b"{'a': 1}", r"not valid JSON"),
                                           (b"{" * 100_000, r"not valid JSON|nested too deep")])
def test_config_json_that_is_not_a_json_object(llama, blob, message):
    (llama / "config.json").write_bytes(blob)
    one_line_error(llama, r"config\.json: " + message)


def test_weights_that_do_not_stack_are_named(llama):
    """q, k and v of different widths: the loader would fail inside torch.cat."""
    tensors = {k: v.clone() for k, v in convert.read_safetensors(str(llama / "model.safetensors")).items()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 3)
    convert.write_safetensors(str(llama / "model.safetensors"), tensors)
    one_line_error(llama, r"config\.json: the weights' parts of layers\.0\.\{self_attn\.q_proj.*do not stack")


def test_weights_without_tensors(llama):
    convert.write_safetensors(str(llama / "model.safetensors"), {})
    one_line_error(llama, r"its weights hold no tensors")


# ----------------------------------------------------------------------------- tokenizer.json

def sentencepiece_json():
    return {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁a", -1.0]], "unk_id": 0},
            "decoder": {"type": "Metaspace"}, "added_tokens": []}


def split_regex(pattern):
    """Change the Split pre-tokenizer's pattern (the regex a stranger's file hands to tiktoken)."""
    return lambda tj: tj["pre_tokenizer"]["pretokenizers"][0].update(pattern=pattern)


def drop_byte_a(tj):
    tj["model"].update(vocab={k: v for k, v in tj["model"]["vocab"].items() if k != "A"}, merges=[])


SPLIT = r"pre_tokenizer Split: its split pattern "
TOKENIZER_CASES = {
    "unigram": (lambda tj: tj.clear() or tj.update(sentencepiece_json()),
                r"a 'Unigram' model is not a byte-level BPE.*danlu reads GPT-2"),
    "wordpiece": (updated(model={"type": "WordPiece", "vocab": {"a": 0}}), r"a 'WordPiece' model is not a byte-level"),
    "sentencepiece_bpe": (updated(decoder={"type": "Metaspace"}),
                          r"a 'BPE' tokenizer with a 'Metaspace' decoder is not a byte-level BPE"),
    "no_model": (lambda tj: tj.pop("model"), r"model is not an object with a type"),
    "vocab_as_list": (lambda tj: tj["model"].update(vocab=["a"]), r"model\.vocab is not an object of token -> id"),
    "string_ids": (lambda tj: tj["model"]["vocab"].update(a="5"), r"model\.vocab is not an object of token -> id"),
    "absurd_id": (lambda tj: tj["model"]["vocab"].update(zz=10**12), r"id 1,000,000,000,000 is not near its"),
    "absurd_added_id": (lambda tj: tj["added_tokens"][0].update(id=10**12), r"id 1,000,000,000,000 is not near its"),
    "merge_without_space": (lambda tj: tj["model"].update(merges=["hell"]), r"model\.merges is not a list of merges"),
    "added_not_objects": (updated(added_tokens=["<|endoftext|>"]), r"added_tokens is not a list of"),
    "decoder_as_string": (updated(decoder="ByteLevel"), r"decoder is not an object"),
    "pretokenizers_garbled": (lambda tj: tj["pre_tokenizer"].update(pretokenizers=[1]),
                              r"pre_tokenizer\.pretokenizers is not a list of objects"),
    "split_pattern_not_regex": (split_regex("abc"), r"pre_tokenizer = \['Split', 'ByteLevel'\] is not supported"),
    "split_regex_matches_empty": (split_regex({"Regex": r"\s*"}), SPLIT + r"matches an empty piece"),
    "split_regex_broken": (split_regex({"Regex": "("}), SPLIT + r"does not compile \(Parsing error"),
    "split_regex_empty_before_one_letter": (split_regex({"Regex": "(?=Å)|[^Å]+|Å"}),  # Å: in the probe text
                                            SPLIT + r"matches an empty piece"),
    "split_regex_huge": (split_regex({"Regex": "(?:(?:(?:a{1000}){1000}){1000}){1000}"}),
                         SPLIT + r"does not compile \(Error compiling regex"),
    "missing_bytes": (drop_byte_a, r"the vocabulary lacks 1 of the 256 single bytes"),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_tokenizer_json_problems_say_what_was_found(llama, case):
    change, message = TOKENIZER_CASES[case]
    edit_json(llama / "tokenizer.json", change)
    one_line_error(llama, r"tokenizer\.json: " + message)


@pytest.mark.parametrize("blob, message", [(b"\xff\xfe", r"not UTF-8"), (b"{", r"not valid JSON"),
                                           (b'"BPE"', r"a string, not a JSON"), (b"null", r"null, not a JSON")])
def test_tokenizer_files_that_are_not_json_objects(llama, blob, message):
    (llama / "tokenizer.json").write_bytes(blob)
    one_line_error(llama, r"tokenizer\.json: " + message)


def test_tokenizer_config_json_that_is_not_an_object(llama):
    (llama / "tokenizer_config.json").write_bytes(b"[]")
    one_line_error(llama, r"tokenizer_config\.json: an array, not a JSON object")


def test_no_tokenizer_is_an_error_never_a_stand_in(llama, gpt2):
    os.remove(llama / "tokenizer.json")
    one_line_error(llama, r"no tokenizer\.json \(found tokenizer_config\.json\); danlu reads a byte-level BPE")
    (llama / "tokenizer.model").write_bytes(b"\x0a\x0bsentencepiece")
    one_line_error(llama, r"found tokenizer\.model, tokenizer_config\.json")
    # a GPT-2 folder without a tokenizer used to get tiktoken's gpt2 whatever its vocabulary was
    os.remove(gpt2 / "tokenizer.json")
    one_line_error(gpt2, r"no tokenizer\.json .*danlu reads a byte-level BPE tokenizer\.json")


def test_a_tokenizer_larger_than_the_model_is_refused(llama):
    edit_json(llama / "tokenizer.json", lambda tj: tj["added_tokens"].append(convert.added_token("<extra>", 300)))
    one_line_error(llama, r"its tokenizer has 301 ids but config\.json's vocab_size is 260")


def test_a_tokenizer_symlinked_out_of_the_folder_is_never_read(llama, tmp_path):
    os.rename(llama / "tokenizer.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", llama / "tokenizer.json")
    one_line_error(llama, r"tokenizer\.json: leaves the folder")


def test_huggingface_cache_snapshots_may_link_to_their_blobs(llama, tmp_path):
    """huggingface_hub keeps models--x/snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in os.listdir(llama):
        os.rename(llama / f, repo / "blobs" / f"hash-{f}")
        os.symlink(f"../../blobs/hash-{f}", snapshot / f)
    assert load(snapshot)[0].n_layer == 2


# ----------------------------------------------------------------------------- meta.json

def meta_file(**fields) -> bytes:
    return json.dumps(fields).encode()


META_CASES = {
    "not_json": (b"{kind: char}", r"is not valid JSON"),
    "not_utf8": (b'{"kind": "\xff"}', r"is not UTF-8 text"),
    "an_array": (b"[]", r"is not a tokenizer description \(it holds an array"),
    "a_string": (b'"char"', r"is not a tokenizer description \(it holds a string"),
    "nested_too_deep": (b'{"kind": ' + b"[" * 100_000, r"is not (valid|readable) JSON"),
    "number_too_long": (b'{"kind": "char", "vocab_size": ' + b"9" * 5000 + b"}", r"is not valid JSON"),
    "chars_not_list": (meta_file(kind="char", chars=5), r"lacks or garbles its table"),
    "chars_not_strings": (meta_file(kind="char", chars=[1, 2]), r"char table holds entries that are not strings"),
    "specials_as_list": (meta_file(kind="char", chars=["a"], special_tokens=["x"]), r"meta\.json: "),
    "specials_as_pairs": (meta_file(kind="char", chars=["a"], special_tokens=[[None, 0]]),
                          r"special token names are not all strings"),
    "absurd_special_id": (meta_file(kind="char", chars=["a"], special_tokens={"<x>": 10**12}),
                          r"token ids reach 1,000,000,000,000, beyond its 1-entry table"),
    "negative_special_id": (meta_file(kind="char", chars=["a"], special_tokens={"<x>": -3}),
                            r"not all whole numbers from 0"),
    "unknown_encoding": (meta_file(kind="tiktoken", encoding="../../etc/passwd"),
                         r"encoding '\.\./\.\./etc/passwd' is not one of tiktoken's"),
    "bpe_bad_base64": (meta_file(kind="bpe", tokens_b64=["!!"], pattern="."), r"meta\.json: "),
    "bpe_missing_bytes": (json.dumps(BPETokenizer([b"a"], ".").to_meta()).encode(), r"lacks 255 of the 256 single"),
    "bpe_empty_match": (meta_file(**{**META, "pattern": "a*"}), r"matches an empty piece"),
    "bpe_broken_pattern": (meta_file(**{**META, "pattern": "(?<"}), r"meta\.json: Parsing error at position 1"),
    "vocab_unk_not_a_token": (meta_file(kind="vocab", tokens=["a"], unk_token="<unk>"),
                              r"unk_token '<unk>' is not one of its tokens"),
}


@pytest.mark.parametrize("case", META_CASES)
def test_meta_json_problems_are_one_line_meta_errors(tmp_path, case):
    blob, message = META_CASES[case]
    (tmp_path / "meta.json").write_bytes(blob)
    with pytest.raises(MetaError, match=message) as e:
        tokenizer.read_meta(str(tmp_path / "meta.json"))
    assert "\n" not in str(e.value) and "meta.json" in str(e.value)


def test_meta_json_that_is_a_fifo_or_folder(tmp_path):
    os.mkfifo(tmp_path / "meta.json")
    with pytest.raises(MetaError, match=r"meta\.json is not a regular file"):
        tokenizer.read_meta(str(tmp_path / "meta.json"))
    with pytest.raises(MetaError, match=r"is not a regular file"):
        tokenizer.read_meta(str(tmp_path))


def test_good_meta_json_still_reads(tmp_path):
    for meta in (META, CharTokenizer.from_text("hello").to_meta()):
        tokenizer.save_meta(str(tmp_path), meta)
        assert tokenizer.read_meta(str(tmp_path / "meta.json")) == json.loads(json.dumps(meta))
