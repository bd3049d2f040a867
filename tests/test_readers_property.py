"""Property tests of the readers that take files from strangers: the safetensors header reader,
the tokenizer.json reader and tokenizer.read_meta (and config.json, through the whole import).
Any byte string, and any structured mutation
of a valid file (a value replaced by another JSON value, a key dropped, a byte flipped, a length
field lied about), gives either a usable result or danlu's one-line error; never another
exception, never a hang (each example has a deadline)."""
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import checkpoint  # noqa: E402
import convert  # noqa: E402
import tokenizer  # noqa: E402
from convert import ConvertError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import BPETokenizer, CharTokenizer, MetaError, VocabTokenizer, from_meta  # noqa: E402

# a few seconds per property; the same examples every run, and no example database left behind
BOUNDED = settings(max_examples=150, deadline=2000, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCRATCH = tempfile.mkdtemp(prefix="danlu-readers-")  # each example's file is written here


@pytest.fixture(scope="module", autouse=True)
def remove_scratch():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


# JSON values a mutation puts in: the edges a reader must bound, and random trees
EDGES = st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, 10**12, -(10**12), 1.5, float("inf"), "",
                         "BPE", "ByteLevel", "F32", "char", "bpe", "gpt2", "a b", [], {}, [0, 0], [0, 10**15],
                         [-1], ["a", "b"], {"Regex": ""}, {"type": "ByteLevel"}, "(?=a)", "a*", "(", "\\p{L}+",
                         "(?<=x)", "."])
LEAVES = EDGES | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12) | st.booleans()
JSON_VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def paths(value, prefix=(), limit=40):
    """Every place in a JSON tree (at most limit entries of each list or object)."""
    yield prefix
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value)) \
        if isinstance(value, list) else []
    for key, child in items[:limit]:
        yield from paths(child, prefix + (key,), limit)


@st.composite
def mutated(draw, base):
    """base (a JSON object) with one to three places replaced by other JSON values or removed."""
    value = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(value))))
        if not where:
            value = copy.deepcopy(draw(JSON_VALUES))  # EDGES hands out the same [] and {} each time
            continue
        parent = value
        for key in where[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[where[-1]] = copy.deepcopy(draw(JSON_VALUES))
        elif isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent.pop(where[-1])
        if not isinstance(value, (dict, list)):
            break
    return json.dumps(value).encode()


@st.composite
def flipped(draw, blob):
    """blob with a few bytes changed, or cut short, or extended."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from([len(data), len(data) - 1, len(data) // 2, len(data) + 7]))
    return bytes(data[:cut]) + b"\x00" * max(0, cut - len(data))


def assert_one_line(error):
    assert "\n" not in str(error) and str(error)


def write(name, blob) -> str:
    path = os.path.join(SCRATCH, name)
    with open(path, "wb") as f:
        f.write(blob)
    return path


# ----------------------------------------------------------------------------- safetensors header

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16),
           "c": torch.ones(3, dtype=torch.bfloat16), "d": torch.zeros(0, 4)}


def valid_safetensors() -> tuple[dict, bytes]:
    path = os.path.join(SCRATCH, "valid.safetensors")
    convert.write_safetensors(path, TENSORS)
    blob = Path(path).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


HEADER, DATA = valid_safetensors()


@st.composite
def near_valid_safetensors(draw):
    header = draw(mutated(HEADER))
    length = draw(st.sampled_from([len(header), len(header) + 1, len(header) - 1, 0, 2**63, 10**8]))
    data = DATA[:draw(st.sampled_from([len(DATA), len(DATA) - 2, 0]))]
    return length.to_bytes(8, "little") + header + data


def read_safetensors_or_error(blob: bytes) -> None:
    try:
        tensors = convert.read_safetensors(write("x.safetensors", blob))
    except ConvertError as e:
        assert_one_line(e)
        return
    for t in tensors.values():  # a result is usable: every view lies inside the file
        t.float().sum()


@BOUNDED
@given(st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: len(b).to_bytes(8, "little") + b))
def test_safetensors_any_bytes(blob):
    read_safetensors_or_error(blob)


@BOUNDED
@given(near_valid_safetensors() | flipped(len(json.dumps(HEADER)).to_bytes(8, "little")
                                          + json.dumps(HEADER).encode() + DATA))
def test_safetensors_near_valid(blob):
    read_safetensors_or_error(blob)


def test_the_valid_safetensors_file_reads():
    blob = len(json.dumps(HEADER)).to_bytes(8, "little") + json.dumps(HEADER).encode() + DATA
    tensors = convert.read_safetensors(write("ok.safetensors", blob))
    assert all(torch.equal(tensors[k], t) for k, t in TENSORS.items())


# ----------------------------------------------------------------------------- tokenizer.json

TABLE = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b" w"]
BPE_META = BPETokenizer(TABLE, convert.GPT2_PATTERN, {"<|endoftext|>": len(TABLE)}).to_meta()
TOKENIZER_JSON = convert.tokenizer_json(BPE_META)
FOLDER = os.path.join(SCRATCH, "folder")
os.makedirs(FOLDER, exist_ok=True)


def read_tokenizer_json_or_error(blob: bytes) -> None:
    write("folder/tokenizer.json", blob)
    try:
        meta = convert.folder_tokenizer(FOLDER, {})
    except ConvertError as e:
        assert_one_line(e)
        return
    tok = from_meta(meta)  # a result is usable
    if meta["kind"] != "vocab":
        tok.decode(tok.encode(tokenizer.PATTERN_PROBE))
    tok.decode(list(range(tok.vocab_size)))


@BOUNDED
@given(st.binary(max_size=200) | st.text(max_size=60).map(str.encode))
def test_tokenizer_json_any_bytes(blob):
    read_tokenizer_json_or_error(blob)


@BOUNDED
@given(mutated(TOKENIZER_JSON) | mutated(convert.tokenizer_json(CharTokenizer(list("abc"), {"<x>": 3}).to_meta()))
       | mutated(convert.tokenizer_json(VocabTokenizer(["<unk>", "a", "b"], {"<unk>": 0}, "<unk>").to_meta())))
def test_tokenizer_json_near_valid(blob):
    read_tokenizer_json_or_error(blob)


def test_the_valid_tokenizer_json_reads():
    write("folder/tokenizer.json", json.dumps(TOKENIZER_JSON).encode())
    assert convert.folder_tokenizer(FOLDER, {})["tokens_b64"][:len(TABLE)] == BPE_META["tokens_b64"][:len(TABLE)]


# ----------------------------------------------------------------------------- meta.json

METAS = [BPE_META, CharTokenizer(list("abc"), {"<x>": 3}).to_meta(),
         VocabTokenizer(["<unk>", "a", "b"], {"<unk>": 0}, "<unk>").to_meta(),
         {"format_version": 2, "kind": "tiktoken", "encoding": "gpt2", "vocab_size": 50257,
          "special_tokens": {"<|endoftext|>": 50256}}]


def read_meta_or_error(blob: bytes) -> None:
    try:
        meta = tokenizer.read_meta(write("meta.json", blob))
    except MetaError as e:
        assert_one_line(e)
        return
    tok = from_meta(meta)  # a result is usable
    if meta["kind"] != "vocab":
        tok.decode(tok.encode(tokenizer.PATTERN_PROBE))
    tok.decode(list(range(min(tok.vocab_size, 5000))))


@BOUNDED
@given(st.binary(max_size=200) | st.text(max_size=60).map(str.encode))
def test_read_meta_any_bytes(blob):
    read_meta_or_error(blob)


@BOUNDED
@given(st.one_of([mutated(m) for m in METAS[:3]]))
def test_read_meta_near_valid(blob):
    read_meta_or_error(blob)


def test_read_meta_near_valid_tiktoken(gpt2_available):
    @BOUNDED
    @given(mutated(METAS[3]))
    def run(blob):
        read_meta_or_error(blob)
    run()


# ----------------------------------------------------------------------------- config.json

LAYOUTS = {"llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
           "gpt2": dict(mlp="gelu_tanh")}
CONFIGS = {}
for name, layout in LAYOUTS.items():  # a tiny folder of each layout, saved by danlu's exporter
    config = GPTConfig(block_size=16, vocab_size=BPE_META["vocab_size"], n_layer=2, n_head=2, n_embd=16, **layout)
    convert.save_hf(config, GPT(config).state_dict(), BPE_META, os.path.join(SCRATCH, name))
    CONFIGS[name] = json.loads(Path(SCRATCH, name, "config.json").read_text(encoding="utf-8"))


@BOUNDED
@given(st.sampled_from(sorted(CONFIGS)).flatmap(lambda name: st.tuples(st.just(name), mutated(CONFIGS[name]))))
def test_config_json_near_valid(case):
    """A config.json a stranger edited: the import ends in a model built from the weights or a
    one-line ConvertError, never in another exception or an allocation the weights do not bound."""
    name, blob = case
    write(f"{name}/config.json", blob)
    try:
        config, state, _ = checkpoint.load_pretrained(os.path.join(SCRATCH, name))
    except ConvertError as e:
        assert_one_line(e)
        return
    GPT(config).load_state_dict(state)
