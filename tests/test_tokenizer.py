"""Tokenizers: round trips, special tokens as real ids, meta.json, the chat template, streaming."""
import itertools
import json
import random

import pytest

from engine import generate
import tokenizer
from tokenizer import (CHAT_TOKENS, END_OF_TURN, ROLE_TOKENS, CharTokenizer, StreamDecoder,
                       TiktokenTokenizer, VocabTokenizer, from_meta)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak.\n"
CHINESE = "你好，世界！大语言模型会把一个汉字切成几个 token。"


def make_tokenizer(kind: str, request):
    if kind == "char":
        return CharTokenizer.from_text(TEXT + "<|>")
    if kind == "vocab":
        return VocabTokenizer(["<pad>", "a", "b", "c", "<img>"])
    request.getfixturevalue("gpt2_available")
    return TiktokenTokenizer("gpt2")


def meta_round_trip(tok):
    """to_meta -> JSON text -> from_meta, as a dataset's meta.json or a checkpoint does it."""
    return from_meta(json.loads(json.dumps(tok.to_meta())))


# ----------------------------------------------------------------------------- round trips

def test_char_round_trip():
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    assert tok.vocab_size == len(set(TEXT)) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == TEXT
    assert tok.encode("F§") == tok.encode("F")  # an unseen character has no id: dropped...
    assert tok.count_unknown("F§") == 1         # ...and counted


def test_gpt2_round_trip(gpt2_available):
    tok = TiktokenTokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.token_id("<|endoftext|>") == 50256
    for text in (TEXT, CHINESE, "emoji 🙂 and tabs\t\r\n"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's own ids


def test_vocab_round_trip():
    tok = VocabTokenizer(["<unk>", "a", "b", "c12"], unk_token="<unk>")
    assert tok.encode("a c12  b\na") == [1, 3, 2, 1]
    assert tok.decode([1, 3, 2]) == "a c12 b"
    assert tok.encode("a zz") == [1, 0]
    with pytest.raises(KeyError, match="zz"):
        VocabTokenizer(["a"]).encode("a zz")


# ----------------------------------------------------------------------------- special tokens

@pytest.mark.parametrize("kind", ["char", "vocab", "gpt2"])
def test_special_tokens_are_appended_ids_that_survive_meta(kind, request):
    tok = make_tokenizer(kind, request)
    base = tok.vocab_size
    assert tok.add_special_tokens(CHAT_TOKENS) == CHAT_TOKENS
    assert [tok.token_id(t) for t in CHAT_TOKENS] == list(range(base, base + len(CHAT_TOKENS)))
    assert tok.vocab_size == base + len(CHAT_TOKENS)
    assert tok.add_special_tokens(CHAT_TOKENS) == []  # adding again changes nothing

    again = meta_round_trip(tok)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.special_tokens == tok.special_tokens
    ids = [tok.token_id(ROLE_TOKENS["user"])] + tok.encode("a b") + [tok.token_id(END_OF_TURN)]
    assert again.decode(ids) == tok.decode(ids)
    assert tok.decode(ids).startswith("<|user|>") and tok.decode(ids).endswith("<|end|>")
    with pytest.raises(KeyError, match="not in this tokenizer"):
        tok.token_id("<|nope|>")


def test_gpt2_text_never_becomes_endoftext(gpt2_available):
    tok = TiktokenTokenizer("gpt2")
    tok.add_special_tokens(CHAT_TOKENS)
    text = "a<|endoftext|>b<|user|>c<|end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_char_text_never_becomes_a_special_token():
    tok = CharTokenizer.from_text(TEXT + "<|>")
    tok.add_special_tokens(CHAT_TOKENS)
    text = "<|user|> hear me <|end|>"
    ids = tok.encode(text)
    assert max(ids) < len(tok.chars)  # every id is a character: user text cannot open a turn
    assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- chat template

def test_render_conversation_ids_and_mask():
    tok = CharTokenizer.from_text(TEXT + "<|>")
    tok.add_special_tokens(CHAT_TOKENS)
    S, U, A = (tok.token_id(ROLE_TOKENS[r]) for r in ("system", "user", "assistant"))
    E = tok.token_id(END_OF_TURN)
    enc = tok.encode
    messages = [{"role": "system", "content": "Speak."},
                {"role": "user", "content": "hear me"},
                {"role": "assistant", "content": "All: speak"},
                {"role": "user", "content": "Before"},
                {"role": "assistant", "content": "we proceed"}]
    ids, mask = tokenizer.render_conversation(tok, messages)

    assert ids == ([S] + enc("Speak.") + [E] + [U] + enc("hear me") + [E]
                   + [A] + enc("All: speak") + [E] + [U] + enc("Before") + [E]
                   + [A] + enc("we proceed") + [E])
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    # the targets are exactly the assistant contents, each with its end-of-turn token
    assert [i for i, m in zip(ids, mask) if m] == enc("All: speak") + [E] + enc("we proceed") + [E]
    # role tokens are never targets: the model is not trained to open turns
    assert all(m == 0 for i, m in zip(ids, mask) if i in (S, U, A))

    prompt, prompt_mask = tokenizer.render_conversation(tok, messages[:2],
                                                        add_generation_prompt=True)
    assert prompt == ids[:len(prompt) - 1] + [A] and prompt_mask == [0] * len(prompt)
    with pytest.raises(ValueError, match="unknown role"):
        tokenizer.render_conversation(tok, [{"role": "robot", "content": "hi"}])


# ----------------------------------------------------------------------------- streaming

def stream(tok, ids) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_waits_for_whole_characters(gpt2_available):
    tok = TiktokenTokenizer("gpt2")
    ids = tok.encode(CHINESE)
    # the test means something only if some token holds part of a character
    assert any(_not_utf8(tok.decode_bytes([i])) for i in ids)
    pieces = stream(tok, ids)
    assert "".join(pieces) == CHINESE == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stream_decoder_matches_decode_on_any_ids(gpt2_available):
    # random ids make broken UTF-8 on purpose: the stream must show the same U+FFFD as decode
    tok = TiktokenTokenizer("gpt2")
    tok.add_special_tokens(CHAT_TOKENS)
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(12))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["char", "vocab"])
def test_stream_decoder_char_and_vocab(kind, request):
    tok = make_tokenizer(kind, request)
    tok.add_special_tokens([END_OF_TURN])
    text = TEXT if kind == "char" else "a b <img> c"
    ids = tok.encode(text) + [tok.token_id(END_OF_TURN)]
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[0] == tok.decode(ids[:1])  # text comes out as soon as it is made


# ----------------------------------------------------------------------------- UTF-8 sampling

def test_utf8_state_agrees_with_pythons_decoder():
    """utf8_state(0, b) is 0 exactly when b decodes, and -1 exactly when no continuation bytes
    could make it decode (every range a continuation must lie in holds one of these)."""
    rng = random.Random(0)
    edges = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1,
             0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    tails = [b""] + [bytes(t) for n in (1, 2, 3) for t in itertools.product((0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF), repeat=n)]
    for _ in range(3000):
        b = bytes(rng.choice(edges) for _ in range(rng.randrange(1, 6)))
        state = tokenizer.utf8_state(0, b)
        assert (state == 0) == (not _not_utf8(b)), b
        assert (state >= 0) == any(not _not_utf8(b + t) for t in tails), b


def test_utf8_automaton_walks_text_and_is_none_for_whole_characters(gpt2_available):
    tok = TiktokenTokenizer("gpt2")
    tok.add_special_tokens(CHAT_TOKENS)
    after = tok.utf8_automaton
    assert after.shape == (8, tok.vocab_size)
    state = 0
    for i in tok.encode(CHINESE + "🙂"):
        state = int(after[state, i])
        assert state >= 0
    assert state == 0
    lead = tok.encode("你")[0]  # the first token of 你 ends inside the character
    assert after[0, lead] > 0 and after[after[0, lead], tok.token_id(END_OF_TURN)] == -1
    assert CharTokenizer.from_text(CHINESE).utf8_automaton is None


def test_sampling_never_writes_a_broken_character():
    """A random model over a byte-level vocabulary writes broken UTF-8 at once; with the
    automaton (what sample, chat, serve and eval use) its text has no U+FFFD."""
    import torch
    from engine import constraint_distance, utf8_constraint
    from model import GPT, GPTConfig
    from tokenizer import BPETokenizer
    tok = BPETokenizer([bytes([i]) for i in range(256)] + ["你".encode(), "好".encode()[:2]], r"\S+|\s+")
    tok.add_special_tokens([END_OF_TURN])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([tok.encode("你")])
    constraint = utf8_constraint(tok, 320, "cpu")
    # the fewest tokens back to a whole character: one per continuation byte owed, here
    assert constraint_distance(constraint.long()).tolist() == [0, 1, 2, 2, 2, 3, 3, 3]
    for guard in (None, constraint):
        for n in (300, 1, 2, 3, 4, 5):  # the text must end whole however short the budget
            out = generate(model, prompt, n, temperature=2.0, generator=torch.Generator().manual_seed(n),
                           constraint=guard)[0, 1:].tolist()
            if n == 300:
                assert ("\ufffd" in tok.decode(out)) == (guard is None)
            elif guard is not None:
                assert "\ufffd" not in tok.decode(out) and len(out) == n
    assert max(out) < tok.vocab_size  # never a padding id of the model's vocabulary


# ----------------------------------------------------------------------------- meta.json

def test_meta_save_load_and_version(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    tokenizer.save_meta(str(tmp_path), tok.to_meta(source={"script": "test"}))
    meta = tokenizer.load_meta(str(tmp_path))
    assert meta["format_version"] == tokenizer.META_VERSION and meta["source"]["script"] == "test"
    assert from_meta(meta).chars == tok.chars
    del meta["format_version"]  # files from before versioning read as version 1
    assert from_meta(meta).vocab_size == tok.vocab_size

    newer = tok.to_meta(format_version=tokenizer.META_VERSION + 1)
    with pytest.raises(ValueError, match="newer than this danlu understands"):
        from_meta(newer)
    with pytest.raises(ValueError, match="vocab_size"):
        from_meta(tok.to_meta(vocab_size=tok.vocab_size + 1))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        from_meta(tok.to_meta(kind="sentencepiece"))
