"""
Tokenizers and the chat template.

Four kinds, all saved to and loaded from a dataset's meta.json (and carried inside every
checkpoint), so a model never needs anything but its ckpt.pt to read and write text:
  char      a table of characters built from the corpus (Shakespeare-char)
  tiktoken  OpenAI's GPT-2 BPE via tiktoken (offline: set TIKTOKEN_CACHE_DIR)
  vocab     an explicit list of whitespace-separated tokens (image codes, imported vocabularies)
  bpe       a byte-level BPE carried whole in meta.json (token bytes by id, split pattern), run
            by tiktoken: what an imported Hugging Face tokenizer.json becomes (convert.py)
Special tokens are real ids (appended after the base vocabulary, or wherever an imported
tokenizer put them); encode() never turns text that merely looks like a special token into one,
so user text cannot inject a turn boundary. A little over ~500 lines: the UTF-8 automaton and the
checks of a stranger's meta.json belong to the tokenizers they describe.
"""
import base64
import codecs
import functools
import json
import os
import re
import unicodedata

import numpy as np

META_VERSION = 2  # 2: the bpe kind; version 1 files (char, tiktoken, vocab) read unchanged

# Chat template: one start-of-turn token per role, then the content, then END_OF_TURN.
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|tool|>",
}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = list(ROLE_TOKENS.values()) + [END_OF_TURN]


def chat_template_jinja() -> str:
    """The chat format as a Jinja template (Hugging Face's and llama.cpp's chat_template):
    <|role|> content <|end|> per message, then <|assistant|> for the reply; render_conversation
    writes the same ids (tests/test_export.py and tests/test_gguf.py check both)."""
    return ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '"
            + END_OF_TURN + "' }}{% endfor %}{% if add_generation_prompt %}{{ '"
            + ROLE_TOKENS["assistant"] + "' }}{% endif %}")


# The split pattern of byte-level BPEs danlu trains (prepare/tokenizer.py; the GGUF export names
# it): GPT-4's, except that a run of CJK characters is a piece of its own (docs/data.md).
CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}ー"
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+[^\P{L}" + CJK + r"]+| ?[" + CJK
                 + r"]+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")


class Tokenizer:
    """Base class: subclasses implement _encode_text/_decode_bytes and the meta fields."""

    kind = ""
    separator = b""  # bytes between two decoded tokens (StreamDecoder needs it)

    def __init__(self, base_size: int, special_tokens: dict | None = None):
        self.base_size = base_size
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}

    @property
    def vocab_size(self) -> int:
        return max([self.base_size - 1, *self.special_tokens.values()]) + 1

    def add_special_tokens(self, names: list[str]) -> list[str]:
        """Append the names that are not yet special tokens as new ids; return the added ones."""
        self.__dict__.pop("utf8_automaton", None)  # computed for the old vocabulary
        added = []
        for name in names:
            if name not in self.special_tokens:
                self.special_tokens[name] = self.vocab_size
                self.id_to_special[self.special_tokens[name]] = name
                added.append(name)
        return added

    def token_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"special token {name!r} is not in this tokenizer "
                           f"(it has: {sorted(self.special_tokens)})")
        return self.special_tokens[name]

    def encode(self, text: str) -> list[int]:
        return self._encode_text(text)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of text that encode() leaves out, each once, in order (byte-level
        tokenizers lose none)."""
        return []

    def decode_bytes(self, ids) -> bytes:
        """Bytes of a token sequence; special tokens are rendered by name."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self.id_to_special:
                if run:
                    out.append(self._decode_bytes(run))
                    run = []
                out.append(self.id_to_special[i].encode("utf-8"))
            else:
                run.append(i)
        if run:
            out.append(self._decode_bytes(run))
        return b"".join(out)

    @functools.cached_property
    def utf8_automaton(self) -> np.ndarray | None:
        """after[s, id] (8, vocab_size): the UTF-8 state (see utf8_state) after token id is written
        in state s, or -1 where its bytes would break a character. Sampling forbids those, so a
        byte-level model never writes U+FFFD (a small model readily puts the middle of one Chinese
        character after the start of another). None when every token is whole characters (char,
        vocab), where there is nothing to forbid."""
        after = np.full((len(UTF8_NEXT), self.vocab_size), -1, dtype=np.int8)
        for i in range(self.vocab_size):
            data = self.decode_bytes([i])
            if not data:  # an id without bytes (a hole in an imported vocabulary) changes nothing
                after[:, i] = np.arange(len(UTF8_NEXT))
            elif data.isascii():
                after[0, i] = 0
            else:
                after[:, i] = [utf8_state(s, data) for s in range(len(UTF8_NEXT))]
        return after if np.any(after[0] != 0) else None

    def to_meta(self, **extra) -> dict:
        meta = {"format_version": META_VERSION, "kind": self.kind, "vocab_size": self.vocab_size,
                **self._meta_fields(), "special_tokens": dict(self.special_tokens)}
        meta.update(extra)
        return meta


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str], special_tokens=None):
        super().__init__(len(chars), special_tokens)
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def _encode_text(self, text: str) -> list[int]:
        # A character the corpus never had has no id: it is dropped (count with count_unknown).
        return [self.stoi[c] for c in text if c in self.stoi]

    def count_unknown(self, text: str) -> int:
        return sum(c not in self.stoi for c in text)

    def unknown_chars(self, text: str) -> list[str]:
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def _decode_bytes(self, ids) -> bytes:
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids).encode()

    def _meta_fields(self) -> dict:
        return {"chars": self.chars}


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, encoding: str = "gpt2", special_tokens=None):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # no network and no cache: say how to fix it
            raise RuntimeError(
                f"tiktoken could not load the {encoding!r} encoding ({e}). Offline, point "
                "TIKTOKEN_CACHE_DIR at a folder holding its BPE files, e.g. "
                "export TIKTOKEN_CACHE_DIR=../shared/tiktoken") from None
        self.encoding = encoding
        specials = {"<|endoftext|>": self.enc.eot_token}
        specials.update(special_tokens or {})
        super().__init__(self.enc.n_vocab, specials)
        # tiktoken's own specials (<|endoftext|>) live inside n_vocab; appended ones come after.
        self.base_size = self.enc.n_vocab

    def _encode_text(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([i for i in ids if i < self.enc.n_vocab])

    def _meta_fields(self) -> dict:
        return {"encoding": self.encoding}


class VocabTokenizer(Tokenizer):
    """An explicit token list; text is whitespace-separated tokens. Special tokens are entries
    of the list (or appended) that are listed in special_tokens."""

    kind = "vocab"
    separator = b" "  # decode_bytes joins tokens with a space

    def __init__(self, tokens: list[str], special_tokens=None, unk_token: str | None = None):
        super().__init__(len(tokens), special_tokens)
        self.tokens = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.tokens)}
        self.unk_token = unk_token

    def add_special_tokens(self, names):
        added = []
        for name in names:
            if name in self.stoi and name not in self.special_tokens:
                self.special_tokens[name] = self.stoi[name]
                self.id_to_special[self.stoi[name]] = name
            elif name not in self.special_tokens:
                self.tokens.append(name)
                self.stoi[name] = len(self.tokens) - 1
                self.special_tokens[name] = self.stoi[name]
                self.id_to_special[self.stoi[name]] = name
                added.append(name)
        self.base_size = len(self.tokens)
        return added

    def encode(self, text: str) -> list[int]:
        """User text: a word that names a special token (<|end|>, <CLS>) reads as an unknown
        word, so it cannot open or close a turn. Unknown words become the unk token (the one
        special id this may produce) or, without one, a KeyError."""
        return self._lookup(text, allow_special=False)

    def encode_tokens(self, text: str) -> list[int]:
        """A token sequence written by a program (prepare scripts, tests): every token spelled
        out, special tokens included."""
        return self._lookup(text, allow_special=True)

    def _lookup(self, text: str, allow_special: bool) -> list[int]:
        ids = []
        for tok in text.split():
            if tok in self.stoi and (allow_special or tok not in self.special_tokens):
                ids.append(self.stoi[tok])
            elif self.unk_token is not None:
                ids.append(self.stoi[self.unk_token])
            elif tok in self.stoi:
                raise KeyError(f"{tok!r} is a special token: user text cannot spell it (a program "
                               "that builds token sequences uses encode_tokens)")
            else:
                raise KeyError(f"token {tok!r} is not in the vocabulary and it has no unk token")
        return ids

    _encode_text = encode

    def decode_bytes(self, ids) -> bytes:
        return " ".join(self.tokens[int(i)] if int(i) < len(self.tokens) else "<?>"
                        for i in ids).encode()

    def _meta_fields(self) -> dict:
        return {"tokens": self.tokens, "unk_token": self.unk_token}


class BPETokenizer(Tokenizer):
    """A byte-level BPE given whole: the bytes of each token by id (a merge's rank is its
    token's id, as in tiktoken), the regex that splits text before merging, an optional Unicode
    normalization, and non-special added tokens that are matched as whole strings first.
    Special tokens may sit anywhere in the id range (SmolLM2 puts them first)."""

    kind = "bpe"

    def __init__(self, token_bytes: list[bytes | None], pattern: str, special_tokens=None,
                 normalization: str | None = None, added_tokens: dict | None = None):
        import tiktoken
        super().__init__(len(token_bytes), special_tokens)
        self.token_bytes = list(token_bytes)
        self.pattern, self.normalization = pattern, normalization
        self.added_tokens = dict(added_tokens or {})
        self.added_bytes = {i: t.encode("utf-8") for t, i in self.added_tokens.items()}
        ranks = {b: i for i, b in enumerate(self.token_bytes) if b is not None}
        self.enc = tiktoken.Encoding("danlu-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={})
        self.added_re = (re.compile("(" + "|".join(map(re.escape, sorted(self.added_tokens, key=len,
                                                                         reverse=True))) + ")")
                         if self.added_tokens else None)

    def _encode_text(self, text: str) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        if self.added_re is None:
            return self.enc.encode_ordinary(text)
        ids = []
        for i, part in enumerate(self.added_re.split(text)):  # odd parts are added tokens
            ids += [self.added_tokens[part]] if i % 2 else self.enc.encode_ordinary(part)
        return ids

    def _decode_bytes(self, ids) -> bytes:
        table, added = self.token_bytes, self.added_bytes
        return b"".join(table[i] if table[i] is not None else added.get(i, b"")
                        for i in ids if i < len(table))

    def _meta_fields(self) -> dict:
        tokens = [None if b is None else base64.b64encode(b).decode("ascii") for b in self.token_bytes]
        return {"pattern": self.pattern, "normalization": self.normalization,
                "added_tokens": self.added_tokens, "tokens_b64": tokens}


# UTF-8 (RFC 3629) as an automaton over bytes. State 0 is between characters; every other state
# owes continuation bytes, and UTF8_NEXT[state] is the range the next byte must lie in and the
# state after it: E0 must be followed by A0..BF (no overlong forms), ED by 80..9F (no
# surrogates), F0 by 90..BF, F4 by 80..8F (nothing past U+10FFFF).
UTF8_NEXT = [None, (0x80, 0xBF, 0), (0x80, 0xBF, 1), (0xA0, 0xBF, 1), (0x80, 0x9F, 1),
             (0x80, 0xBF, 2), (0x90, 0xBF, 2), (0x80, 0x8F, 2)]


def utf8_state(state: int, data: bytes) -> int:
    """The state after data is written in state; -1 if data breaks UTF-8 there."""
    for byte in data:
        if state:
            lo, hi, state = UTF8_NEXT[state]
            if not lo <= byte <= hi:
                return -1
        elif byte < 0x80:
            state = 0
        elif 0xC2 <= byte <= 0xDF:
            state = 1
        elif 0xE1 <= byte <= 0xEF and byte != 0xED:
            state = 2
        elif byte in (0xE0, 0xED):
            state = 3 if byte == 0xE0 else 4
        elif 0xF1 <= byte <= 0xF3:
            state = 5
        elif byte in (0xF0, 0xF4):
            state = 6 if byte == 0xF0 else 7
        else:  # 80..C1 (a continuation or an overlong lead), F5..FF
            return -1
    return state


class StreamDecoder:
    """Token ids in, one at a time; out, the text that is complete so far (for streaming to a
    terminal). A BPE token can end inside a UTF-8 character (a Chinese character often spans two
    or three GPT-2 tokens), so its bytes wait here until the character is whole. feed() for every
    id, then flush(), gives exactly tok.decode(ids)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started = False

    def feed(self, token_id: int) -> str:
        piece = self.tok.decode_bytes([token_id])
        if self.started:
            piece = self.tok.separator + piece
        self.started = True
        return self.utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD, as in decode)."""
        return self.utf8.decode(b"", final=True)


def from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer that a meta.json (or a checkpoint's 'tokenizer' entry) describes."""
    version = meta.get("format_version", 1)
    if version > META_VERSION:
        raise ValueError(f"meta.json format_version {version} is newer than this danlu "
                         f"understands ({META_VERSION}); update danlu")
    kind, specials = meta.get("kind"), meta.get("special_tokens", {})
    if kind == "char":
        tok = CharTokenizer(meta["chars"], specials)
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(meta.get("encoding", "gpt2"), specials)
    elif kind == "vocab":
        tok = VocabTokenizer(meta["tokens"], specials, meta.get("unk_token"))
    elif kind == "bpe":
        table = [None if t is None else base64.b64decode(t) for t in meta["tokens_b64"]]
        tok = BPETokenizer(table, meta["pattern"], specials, meta.get("normalization"),
                           meta.get("added_tokens"))
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} in meta.json (char, tiktoken, vocab or bpe)")
    if tok.vocab_size != meta.get("vocab_size", tok.vocab_size):
        raise ValueError(f"meta.json says vocab_size={meta['vocab_size']} but its tokenizer "
                         f"has {tok.vocab_size} ids; the file was edited or is corrupt")
    return tok


def dropped_note(tok: Tokenizer, text: str) -> str | None:
    """What a user is told when characters of their message do not reach the model (a char
    vocabulary built from its data has no id for them), or None when every character does."""
    unknown = tok.unknown_chars(text)
    if not unknown:
        return None
    shown = " ".join(repr(c) for c in unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
    return f"(this model's vocabulary lacks {shown}: left out of what it reads)"


def same_base(a: dict, b: dict) -> bool:
    """True when meta b encodes text exactly as meta a does: the same kind and table, and every
    special token of a at the same id in b (b may append more, as SFT data does)."""
    if a.get("kind") != b.get("kind") or b["vocab_size"] < a["vocab_size"]:
        return False
    table = {"char": ("chars",), "tiktoken": ("encoding",),
             "bpe": ("tokens_b64", "pattern", "normalization", "added_tokens")}.get(a["kind"], ())
    if a["kind"] == "vocab":
        same = b["tokens"][:len(a["tokens"])] == a["tokens"]
    else:
        default = {"encoding": "gpt2"}  # meta.json files from before the key was written
        same = all(a.get(k, default.get(k)) == b.get(k, default.get(k)) for k in table)
    specials = b.get("special_tokens", {})
    return same and all(specials.get(k) == v for k, v in a.get("special_tokens", {}).items())


def load_meta(data_dir: str) -> dict:
    """A dataset's meta.json, checked whole (its tokenizer rebuilds) so a broken file fails
    here, naming itself, and not later in sample.py."""
    return read_meta(os.path.join(data_dir, "meta.json"))


class MetaError(ValueError):
    """A tokenizer description that cannot be read; the message is one line naming the file."""


MAX_JSON_BYTES = 256 * 2**20  # far above any real meta.json / tokenizer.json (Gemma's is ~35 MB)
# text a split pattern must cut into non-empty pieces (tiktoken's encoder panics on an empty
# one): mixed words and scripts, then every printable ASCII character
PATTERN_PROBE = ("Hello world, it's 2024!  Tabs\tand\nnew lines;  x=3.14 你好，世界！ 🙂👍🏽 naïve\r\n"
                 + "".join(map(chr, range(32, 127))))


def one_line(error) -> str:
    """An exception's message on one line, cut short: a library's (Rust regex errors span lines)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def json_value(data: bytes):
    """The JSON value that data holds, else ValueError saying why not (not UTF-8, not JSON, or
    nested too deep for Python's parser)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r})") from None
    except RecursionError:
        raise ValueError("not readable JSON (nested too deep)") from None
    except ValueError as e:  # JSONDecodeError, or a number too long to convert
        raise ValueError(f"not valid JSON ({one_line(e)})") from None


def small_file(path: str) -> bytes:
    """The bytes of a small file from anyone (meta.json, a Hugging Face folder's JSON): a
    regular file (a FIFO would block) of at most MAX_JSON_BYTES, else ValueError saying why."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError("is not a regular file")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ValueError(f"holds {size:,} bytes, more than any such file ({MAX_JSON_BYTES:,})")
    with open(path, "rb") as f:
        return f.read()


def json_kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "true/false"}.get(type(value), "null")


def pattern_problem(pattern: str, *texts: str) -> str | None:
    """Why tiktoken cannot split text with this regex, or None: it does not compile (tiktoken's
    own compiler refuses, within its size limits, before Python's regex sees it), or it matches
    an empty piece somewhere in a probe text or in texts (on which tiktoken's encoder panics)."""
    import regex
    import tiktoken
    singles = {bytes([b]): b for b in range(256)}
    try:
        tiktoken.Encoding("probe", pat_str=pattern, mergeable_ranks=singles, special_tokens={})
        for text in ("", PATTERN_PROBE, *texts):
            if any(m.start() == m.end() for m in regex.finditer(pattern, text, timeout=1.0)):
                return f"its split pattern matches an empty piece of {text!r}"
    except (TypeError, ValueError, regex.error) as e:
        return f"its split pattern does not compile ({one_line(e)})"
    except TimeoutError:
        return "its split pattern takes over a second on a short text (catastrophic backtracking)"
    return None


def table_problem(tok: Tokenizer) -> str | None:
    """What would make a tokenizer built from a file fail later, or None: special or added ids
    that are not whole numbers or reach far past the table (every vocab_size-long array would
    follow them), table entries of the wrong type, or a bpe table tiktoken would panic on."""
    specials = list(tok.special_tokens.values())
    added = list(getattr(tok, "added_tokens", {}).values())
    if not all(type(i) is int and i >= 0 for i in specials + added):
        return "its special or added token ids are not all whole numbers from 0"
    if not all(isinstance(name, str) for name in tok.special_tokens):  # a list of pairs reads as a dict
        return "its special token names are not all strings"
    if tok.vocab_size > tok.base_size + len(specials) or any(i >= tok.base_size for i in added):
        return f"its token ids reach {max(specials + added):,}, beyond its {tok.base_size:,}-entry table"
    entries = {"char": getattr(tok, "chars", []), "vocab": getattr(tok, "tokens", [])}.get(tok.kind, [])
    if not all(isinstance(t, str) for t in entries):
        return f"its {tok.kind} table holds entries that are not strings"
    if tok.kind == "vocab" and tok.unk_token is not None and tok.unk_token not in tok.stoi:
        return f"its unk_token {str(tok.unk_token)[:40]!r} is not one of its tokens"
    if tok.kind == "bpe":
        if tok.normalization not in (None, "", "NFC", "NFD", "NFKC", "NFKD"):
            return f"normalization {str(tok.normalization)[:40]!r} is not NFC, NFD, NFKC or NFKD"
        missing = set(range(256)) - {t[0] for t in tok.token_bytes if t is not None and len(t) == 1}
        if missing:  # tiktoken's encoder panics on a byte it has no token for
            return f"its table lacks {len(missing)} of the 256 single bytes"
        return pattern_problem(tok.pattern)
    return None


def read_meta(path: str, fix: str = "re-run the prepare script") -> dict:
    """A tokenizer description from any file (a dataset's meta.json, or a tokenizer that
    prepare/tokenizer.py trained), checked whole; every problem of the file's content is a
    one-line MetaError naming the file and ending with fix (a missing file stays
    FileNotFoundError)."""
    try:
        data = small_file(path)
    except ValueError as e:
        raise MetaError(f"{path} {e}; {fix}") from None
    try:
        meta = json_value(data)
    except ValueError as e:
        raise MetaError(f"{path} is {e}; {fix}") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise MetaError(f"{path} is not a tokenizer description (it holds {json_kind(meta)}; one is a "
                        f"JSON object with kind, vocab_size and the table); {fix}")
    if meta["kind"] == "tiktoken" and meta.get("encoding", "gpt2") not in tiktoken_names():
        raise MetaError(f"{path}: encoding {str(meta['encoding'])[:40]!r} is not one of tiktoken's "
                        f"({', '.join(tiktoken_names())}); {fix}")
    try:
        problem = table_problem(from_meta(meta))
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise MetaError(f"{path} lacks or garbles its table ({type(e).__name__}: {one_line(e)}); "
                        f"{fix}") from None
    except ValueError as e:
        raise MetaError(f"{path}: {one_line(e)}") from None
    if problem:
        raise MetaError(f"{path}: {problem}; {fix}")
    return meta


def tiktoken_names() -> list[str]:
    import tiktoken
    return tiktoken.list_encoding_names()


def save_meta(data_dir: str, meta: dict) -> None:
    os.makedirs(data_dir, exist_ok=True)
    tmp = os.path.join(data_dir, "meta.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(data_dir, "meta.json"))


# ----------------------------------------------------------------------------- chat template

def render_conversation(tok: Tokenizer, messages: list[dict],
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render [{"role", "content"}, ...] to (ids, mask). mask[i] = 1 where ids[i] is a training
    target: the content of assistant turns and their end-of-turn token, nothing else. With
    add_generation_prompt, an assistant start-of-turn is appended for the model to continue.
    The same function builds SFT data and chat prompts, so the two cannot drift apart."""
    end = tok.token_id(END_OF_TURN)
    ids, mask = [], []
    for m in messages:
        role = m["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role {role!r}; the template knows {sorted(ROLE_TOKENS)}")
        content = tok.encode(m["content"])
        target = 1 if role == "assistant" else 0
        ids += [tok.token_id(ROLE_TOKENS[role])] + content + [end]
        mask += [0] + [target] * len(content) + [target]
    if add_generation_prompt:
        ids.append(tok.token_id(ROLE_TOKENS["assistant"]))
        mask.append(0)
    return ids, mask


def fit_conversation(tok: Tokenizer, messages: list[dict], max_length: int,
                     add_generation_prompt: bool = False):
    """(messages, ids, mask) cut at turn boundaries to at most max_length tokens, or None when
    even the latest exchange does not fit. Leading system turns are kept; whole exchanges (a user
    turn and the turns after it) go oldest first, so what follows the system turn starts with a
    user turn. prepare/sft.py cuts training conversations and sample.py --chat its history with
    this one function, so the model is never asked to continue a shape it was not trained on."""
    ids, mask = render_conversation(tok, messages, add_generation_prompt)
    if len(ids) <= max_length:
        return messages, ids, mask
    n_head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    lengths = [len(render_conversation(tok, [m])[0]) for m in messages]
    head = sum(lengths[:n_head]) + int(add_generation_prompt)
    for cut in range(n_head + 1, len(messages)):  # earliest cut first: keep as much as fits
        if messages[cut]["role"] != "user" or head + sum(lengths[cut:]) > max_length:
            continue
        kept = messages[:n_head] + messages[cut:]
        ids, mask = render_conversation(tok, kept, add_generation_prompt)
        if len(ids) <= max_length:  # per-turn lengths add up in this template; check anyway
            return kept, ids, mask
    return None
