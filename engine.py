"""
The one way danlu turns a prompt or a conversation into a reply: loading a model for
inference, fitting a conversation's history to the window, the UTF-8 constraint on byte-level
tokenizers, the decode loop (KV cache, context shift past the window, top-k / top-p, stop
tokens), continuous batching (BatchDecoder: many requests as one batch, joining and leaving at
any step, for serve.py), text streamed whole characters at a time, stop strings, and reply().
sample.py, serve.py, eval.py and sft.py all decode through here.
"""
import collections
import contextlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from checkpoint import load_model
from data import DataError
from model import GPT, KVCache
from runtime import Runtime, setup_runtime
from settings import ConfigError
from tokenizer import END_OF_TURN, StreamDecoder, Tokenizer, fit_conversation, from_meta, render_conversation

# Decoding changes the key length every step; cuDNN attention builds a new plan for each new
# length, which made bf16 generation on an H100 about 20x slower (docs/lab-notes.md). Decode without it.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def load_for_inference(source: str, device: str = "auto", dtype: str = "auto", block_size: int = 0,
                       threads: int = 0):
    """(model in eval mode, tokenizer, checkpoint, runtime) for a run folder, a .pt file, a
    Hugging Face folder or a GPT-2 name; block_size > 0 limits the context it reads."""
    run = setup_runtime(device, dtype, threads)
    model, ckpt = load_model(source, run.device)
    trained = model.config.block_size
    if block_size > trained:
        raise ConfigError(f"block_size = {block_size} is larger than the {trained} positions "
                          f"the checkpoint was trained with; use --block_size={trained} or less", "block_size")
    if block_size:
        model.config.block_size = block_size
    return model, from_meta(ckpt["tokenizer"]), ckpt, run


# ----------------------------------------------------------------------------- sampling

def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else softmax(logits / t)
    restricted to the top_k most likely tokens and the smallest set holding top_p of the mass."""
    if temperature <= 1e-6:  # greedy; a tinier temperature would only overflow into NaN
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    u = torch.rand(probs.size(0), generator=generator, device=probs.device)
    if not bool(torch.isfinite(probs).all()):
        raise RuntimeError("the model's next-token probabilities are not finite")
    return inverse_cdf(probs, u)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Row b's token: the first whose cumulative probability passes u[b] (B,) in [0, 1) of the
    row's mass; a zero-probability token is never picked. One uniform number per row (as
    llama.cpp samples), where torch.multinomial draws an exponential per vocabulary entry:
    those were a fifth of a batched decode step at 8 rows of an 8k vocabulary."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return token.clamp_(max=probs.size(-1) - 1).squeeze(-1)


def sampling_probs(logits: Tensor, temperature: float, top_k: int | None, top_p: float) -> Tensor:
    """sample_next's distribution (B, V) at temperature > 0; each row on its own."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = max(top_p, 1e-6)  # the most likely token always stays, however small top_p
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return F.softmax(logits, dim=-1)


def constraint_distance(constraint: Tensor) -> Tensor:
    """(S,) the fewest tokens that lead from each state of a token automaton (S, V; -1: no
    move) back to state 0; a state that never returns gets S (more than any real distance)."""
    S = constraint.size(0)
    dist = torch.full((S,), S, dtype=torch.long, device=constraint.device)
    dist[0] = 0
    for _ in range(S):  # Bellman-Ford: S rounds settle every shortest path
        via = torch.where(constraint >= 0, dist[constraint.clamp(min=0)] + 1, S)  # (S, V)
        dist = torch.minimum(dist, via.min(dim=1).values)
        dist[0] = 0
    return dist


@torch.no_grad()
def generate_stream(model: GPT, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float = 1.0, stop_tokens=(),
                    use_cache: bool = True, generator: torch.Generator | None = None,
                    constraint: Tensor | None = None):
    """Yield the next token of each row (B,) for up to max_new_tokens steps, stopping early
    once every row has produced a stop token (a finished row repeats its stop token).
    constraint (S, V), a token automaton: every row starts in state 0, may only sample a
    token t with constraint[state, t] >= 0, and moves to that state; near max_new_tokens only
    to states from which state 0 is still reachable in the steps left, so the text also ends
    in state 0 (tokenizer.py's utf8_automaton: a byte-level model never writes, nor stops
    inside, a broken character).

    Without the cache every step runs the last block_size tokens (nanoGPT's crop): exact,
    and past the window as slow as a whole forward per token. With the cache each step runs
    one position while the text fits block_size, with the same tokens as without it. Once
    the cache is full the context shifts (as llama.cpp's context shift does): the most
    recent block_size - block_size // 4 tokens are recomputed once, from position 0, and
    decoding continues one position at a time until the cache is full again. So past the
    window each token is the model's exact prediction from the last L tokens, L between
    3/4 of block_size and block_size (nanoGPT always uses block_size), for learned and
    rotary positions alike; a forward over 3/4 of the window is paid once per block_size // 4
    tokens instead of a whole window per token. use_cache=False stays the exact reference."""
    block = model.config.block_size
    keep = max(1, block - max(1, block // 4))  # tokens kept at a context shift
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    state = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)  # of the constraint
    if constraint is not None:
        constraint = constraint.long()
        # (S, V): tokens still owed after t is written in state s before state 0 is back;
        # a forbidden move owes more than any budget, so one comparison per step masks both
        owed = torch.where(constraint >= 0, constraint_distance(constraint)[constraint.clamp(min=0)],
                           max_new_tokens)
    caches, pos = None, 0
    for step in range(max_new_tokens):
        with sdpa_kernel(DECODE_BACKENDS):
            if caches is not None and pos < caches[0].k.size(2):
                x = model.body(idx[:, -1:], caches, pos)  # one new position
                pos += 1
            else:  # the first step, a full cache (shift), or no cache at all
                context = idx[:, -(block if caches is None else keep):]
                if use_cache:
                    caches = caches or model.make_caches(idx.size(0), min(block, idx.size(1) + max_new_tokens))
                x = model.body(context, caches if use_cache else None, 0)
                pos = context.size(1)
        logits = model.head(x[:, -1, :]).float()  # (B, V)
        if constraint is not None:  # tokens still to come after this one: max_new_tokens - step - 1
            logits = logits.masked_fill(owed[state] > max_new_tokens - step - 1, float("-inf"))
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        if constraint is not None:
            state = constraint[state, next_token].clamp(min=0)  # a finished row may be anywhere
        if stop.numel():
            next_token = torch.where(done, idx[:, -1], next_token)
            done |= torch.isin(next_token, stop)
        idx = torch.cat([idx, next_token[:, None]], dim=1)
        yield next_token
        if stop.numel() and bool(done.all()):
            return


@torch.no_grad()
def generate(model: GPT, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, stop_tokens=(), use_cache: bool = True,
             generator: torch.Generator | None = None, constraint: Tensor | None = None) -> Tensor:
    """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens; temperature 0 is greedy."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                               use_cache, generator, constraint))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


# ----------------------------------------------------------------------------- continuous batching

class CacheView:
    """Rows of a pooled KVCache (slot a, or slots 0 .. b - 1) for the model's cache.update."""
    update = KVCache.update

    def __init__(self, cache: KVCache, rows: slice):
        self.k, self.v = cache.k[rows], cache.v[rows]


class Row:
    """One request in a BatchDecoder: its sampling settings and where it has got to."""

    def __init__(self, ids, max_new_tokens, temperature, top_k, top_p, generator, stop_tokens, owed, tag):
        self.ids, self.max_new_tokens, self.generator = list(ids), max_new_tokens, generator
        self.temperature, self.top_k, self.top_p = temperature, top_k or None, top_p
        self.stop_tokens, self.owed, self.tag = set(stop_tokens), owed, tag
        self.state = self.n = 0  # the constraint's state; tokens made so far
        self.slot = None  # its rows in the cache pool, once it has one
        self.context, self.prefilled, self.pos = [], 0, 0  # tokens to prefill, how many are in; next position
        self.done = False
        self.error = None  # why it failed, if it did (BatchDecoder.failed)
        self.seq = 0  # admission order: the oldest prefills first


class BatchDecoder:
    """Continuous batching: the rows in flight decode as one batch, one token each per step,
    and rows join and leave at any step. The KV cache is a pool of `slots` preallocated rows of
    block_size positions (made on first use); a row waits for a free slot, then its prompt is
    prefilled into it `chunk` tokens per step between decode steps, so a long prompt does not
    stall the others. Each row keeps its own sampling settings, generator, stop tokens, UTF-8
    constraint state and length, and samples exactly as generate_stream does for one row
    (context shift past the window included); only the float rounding of a batched forward
    can differ from a forward of that row alone."""

    def __init__(self, model: GPT, slots: int = 8, chunk: int = 64, autocast=None):
        self.model, self.chunk, self.autocast = model, chunk, autocast or contextlib.nullcontext()
        self.block = model.config.block_size
        self.keep = max(1, self.block - max(1, self.block // 4))  # tokens kept at a context shift
        self.caches = None
        self.slots: list[Row | None] = [None] * slots
        self.waiting = collections.deque()
        self.owed_tables = {}  # id(constraint) -> (tokens still owed per (state, token), constraint)
        self.admitted = 0
        self.failed: list[Row] = []  # rows the last step() dropped, each with its .error

    def add(self, ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float = 1.0, generator: torch.Generator | None = None, stop_tokens=(),
            constraint: Tensor | None = None, tag=None) -> Row:
        """Queue a request; its tokens come out of step() as (row, token); row.tag is the caller's."""
        if not ids or max_new_tokens < 1:
            raise ValueError("a row needs a prompt and max_new_tokens >= 1")
        owed = None
        if constraint is not None:
            if id(constraint) not in self.owed_tables:
                table = constraint.long()
                # a forbidden move owes more than any budget, as in generate_stream
                owed = torch.where(table >= 0, constraint_distance(table)[table.clamp(min=0)], 2 ** 40)
                self.owed_tables[id(constraint)] = (owed, table, constraint)  # constraint: keeps the id alive
            owed = self.owed_tables[id(constraint)][:2]
        row = Row(ids, max_new_tokens, temperature, top_k, top_p, generator, stop_tokens, owed, tag)
        self.waiting.append(row)
        return row

    def remove(self, row: Row) -> None:
        """Drop a row (its client left, or a stop string ended it); its slot is free at once."""
        row.done = True
        if row.slot is not None:
            self.slots[row.slot], row.slot = None, None
        elif row in self.waiting:
            self.waiting.remove(row)

    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def run(self) -> None:
        """Step until every row is done, for a fixed set of rows wanted whole (eval's replies,
        RL's rollouts): the first row that fails raises its error."""
        while self.busy():
            self.step()
            if self.failed:
                raise self.failed[0].error

    def rows(self) -> list[Row]:
        return [r for r in self.slots if r is not None] + list(self.waiting)

    def _start(self, row: Row, context: list[int]) -> None:
        row.context, row.prefilled, row.pos = context, 0, 0

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int]]:
        """One round: waiting rows take free slots; rows whose cache is full shift their context;
        up to `chunk` prompt tokens are prefilled (a row whose prompt is in makes its first
        token); every row that was already decoding makes one token, in one forward. Returns
        the (row, token) pairs made; a row that is done (a stop token, max_new_tokens) has
        left its slot. A row whose own work fails (its prefill, its draw) leaves with .error and
        is listed in self.failed; the others go on. Only an error in the one batched decode
        forward, which cannot be told apart by row, reaches the caller."""
        self.failed = []
        if self.caches is None:
            self.caches = self.model.make_caches(len(self.slots), self.block)
        while self.waiting and None in self.slots:
            row = self.waiting.popleft()
            row.slot, row.seq = self.slots.index(None), self.admitted
            self.slots[row.slot], self.admitted = row, self.admitted + 1
            self._start(row, row.ids[-self.block:])
        for row in self.slots:
            if row is not None and row.prefilled == len(row.context) and row.pos >= self.block:
                self._start(row, row.ids[-self.keep:])  # context shift, as generate_stream
        decoding = [r for r in self.slots if r is not None and r.prefilled == len(r.context)]
        pending = []  # (row, its logits (1, V)) to sample from
        with self.autocast, sdpa_kernel(DECODE_BACKENDS):
            budget = self.chunk
            for row in sorted((r for r in self.slots if r is not None and r.prefilled < len(r.context)),
                              key=lambda r: r.seq):
                if budget <= 0:
                    break
                # chunks end at multiples of `chunk`, whatever else runs: a row's floats never
                # depend on the others
                a = row.prefilled
                b = min(len(row.context), (a // self.chunk + 1) * self.chunk)
                x = torch.tensor([row.context[a:b]], dtype=torch.long, device=self.device)
                views = [CacheView(c, slice(row.slot, row.slot + 1)) for c in self.caches]
                budget -= b - a
                try:  # its own slot only: a prompt that fails (out of memory) fails its request
                    h = self.model.body(x, views, a)
                    logits = self.model.head(h[:, -1, :]).float() if b == len(row.context) else None
                except Exception as e:
                    self._fail(row, e)
                    continue
                row.prefilled = b
                if logits is not None:
                    row.pos = b
                    pending.append((row, logits))
            if len(decoding) == 1:  # one row: the plain int-position step (no key mask to build)
                r = decoding[0]
                x = torch.tensor([[r.ids[-1]]], dtype=torch.long, device=self.device)
                h = self.model.body(x, [CacheView(c, slice(r.slot, r.slot + 1)) for c in self.caches], r.pos)
                r.pos += 1
                pending.append((r, self.model.head(h[:, -1, :]).float()))
            elif decoding:
                hi = max(r.slot for r in decoding) + 1
                tokens, pos = [0] * hi, [0] * hi
                for r in self.slots[:hi]:  # a slot not decoding gets a dummy where it writes next
                    if r is not None:
                        pos[r.slot] = r.pos if r in decoding else min(r.prefilled, self.block - 1)
                for r in decoding:
                    tokens[r.slot] = r.ids[-1]
                x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
                p = torch.tensor(pos, dtype=torch.long, device=self.device)
                h = self.model.body(x, [CacheView(c, slice(0, hi)) for c in self.caches], p)
                logits = self.model.head(h[:, -1, :]).float()  # (hi, V)
                for r in decoding:
                    r.pos += 1
                    pending.append((r, logits[r.slot:r.slot + 1]))
        return self._sample(pending)

    @property
    def device(self):
        return self.model.lm_head.weight.device

    def _sample(self, pending: list[tuple[Row, Tensor]]) -> list[tuple[Row, int]]:
        """A token for each row from its logits, exactly as sample_next draws it for that row
        alone. Rows with the same temperature, top_k and top_p share one filtering pass and one
        inverse-CDF draw, each row with the uniform number its own generator gives."""
        groups = {}
        for row, logits in pending:
            if row.owed is not None:  # tokens still to come after this one
                logits = logits.masked_fill(row.owed[0][row.state] > row.max_new_tokens - row.n - 1, float("-inf"))
            groups.setdefault((row.temperature, row.top_k, row.top_p), []).append((row, logits))
        made = []
        for (temperature, top_k, top_p), items in groups.items():
            logits = torch.cat([lg for _, lg in items])
            if temperature <= 1e-6:  # greedy, as sample_next
                tokens = logits.argmax(dim=-1).tolist()
            else:
                probs = sampling_probs(logits, temperature, top_k, top_p)
                u = torch.cat([torch.rand(1, generator=row.generator, device=probs.device) for row, _ in items])
                tokens = inverse_cdf(probs, u).tolist()
                # what sample_next refuses (inf, nan) fails that row alone
                bad = (~torch.isfinite(probs).all(dim=-1)).tolist()
                for i, (row, _) in enumerate(items):
                    if bad[i]:
                        self._fail(row, RuntimeError("the model's next-token probabilities are not "
                                                     "finite for this request"))
                        tokens[i] = None
            made += [(row, self._take(row, t)) for (row, _), t in zip(items, tokens) if t is not None]
        return made

    def _fail(self, row: Row, error: Exception) -> None:
        """This row alone cannot go on: it leaves, and the caller finds it in self.failed."""
        row.error = error
        self.failed.append(row)
        self.remove(row)

    def _take(self, row: Row, t: int) -> int:
        if row.owed is not None:
            row.state = int(row.owed[1][row.state, t].clamp(min=0))
        row.ids.append(t)
        row.n += 1
        if t in row.stop_tokens or row.n >= row.max_new_tokens:
            self.remove(row)
        return t


# ----------------------------------------------------------------------------- text

def utf8_constraint(tok, vocab_size: int, device) -> torch.Tensor | None:
    """The tokenizer's UTF-8 automaton over the model's vocab_size ids (the padding ids past the
    tokenizer's are never written), or None for tokenizers of whole characters."""
    after = tok.utf8_automaton
    if after is None:
        return None
    table = torch.full((after.shape[0], vocab_size), -1, dtype=torch.int8)
    table[:, :after.shape[1]] = torch.from_numpy(after[:, :vocab_size])
    return table.to(device)


def decode_stream(model, tok, ids: list[int], run, generator, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float, stop_tokens=(), use_cache: bool = True, utf8: bool = True):
    """Generate after ids, one token at a time: yield (token id, the text it completes; "" while
    a multi-byte character is still partial). A stop token is yielded with "" and ends the
    stream; the last item is (None, whatever the decoder still held). sample.py prints these
    pieces, serve.py streams them. utf8=False turns the UTF-8 constraint off (to match another
    implementation token for token)."""
    x = torch.tensor([ids], dtype=torch.long, device=run.device)
    decoder = StreamDecoder(tok)
    constraint = utf8_constraint(tok, model.config.vocab_size, run.device) if utf8 else None
    tokens = generate_stream(model, x, max_new_tokens, temperature, top_k or None, top_p, stop_tokens,
                             use_cache, generator, constraint)
    while True:
        with run.autocast:
            t = next(tokens, None)
        if t is None:
            break
        t = int(t[0])
        if t in stop_tokens:
            yield t, ""
            break
        yield t, decoder.feed(t)
    yield None, decoder.flush()


class StopStrings:
    """Cuts streamed text at the first stop string to appear. Text that could be the start of
    a stop string waits until the next piece settles it, so none is ever sent. Each stop string
    is matched incrementally (Knuth-Morris-Pratt: per stop, the length of its longest prefix the
    text ends with), so a piece costs its own length, however long the stop strings are;
    re-scanning the held text for every prefix cost O(length^2) per token."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fallback = [self.prefix_table(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop: how much of it the text ends with
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send, whether a stop string was found)."""
        text, start = self.held + text, len(self.held)
        for i in range(start, len(text)):
            matched = [self.advance(j, text[i]) for j in range(len(self.stops))]
            ends = [k for k, s in zip(matched, self.stops) if k == len(s)]
            if ends:  # cut before the longest stop string ending here: none of it is sent
                self.held, self.matched = "", [0] * len(self.stops)
                return text[:i + 1 - max(ends)], True
        keep = max(self.matched, default=0)  # the longest tail that may still start a stop string
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def advance(self, j: int, c: str) -> int:
        """How much of stop string j the text ends with, once c is added to it."""
        stop, k = self.stops[j], self.matched[j]
        while k and stop[k] != c:
            k = self.fallback[j][k - 1]
        self.matched[j] = k = k + (stop[k] == c)
        return k

    def flush(self) -> str:
        text, self.held, self.matched = self.held, "", [0] * len(self.stops)
        return text

    @staticmethod
    def prefix_table(s: str) -> list[int]:
        """KMP's table: [k] is the length of the longest proper prefix of s[:k + 1] that is also
        its suffix, where matching carries on when the character after s[:k + 1] differs."""
        table, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = table[k - 1]
            k += s[i] == s[k]
            table[i] = k
        return table


# ----------------------------------------------------------------------------- conversations

def fit_history(tok, system: list[dict], history: list[dict], budget: int) -> tuple[list[dict], list[int]]:
    """(history kept, prompt ids of at most budget tokens) for system + history + a generation
    prompt. Whole exchanges go oldest first, as prepare/sft.py cuts training data. When even the
    newest user turn does not fit, the system turn goes too and the turn keeps its last tokens."""
    fitted = fit_conversation(tok, system + history, budget, add_generation_prompt=True)
    if fitted is not None:
        return fitted[0][len(system):], fitted[1]
    turn = history[-1]
    ids = render_conversation(tok, [turn], add_generation_prompt=True)[0]  # <|user|> ... <|end|> <|assistant|>
    if len(ids) <= budget:
        print("(the system prompt does not fit beside this message: left out for this turn)", file=sys.stderr)
        return [turn], ids
    print(f"(your message is {len(ids) - 3} tokens; the model reads its last {budget - 3})", file=sys.stderr)
    return [turn], ids[:1] + ids[len(ids) - budget + 1:]


def reply(model: GPT, tok: Tokenizer, ids: list[int], max_new_tokens: int, run: Runtime,
          utf8: bool = True) -> str:
    """The greedy reply after prompt ids (a conversation rendered up to the assistant's start),
    cut at the end of the turn. The reply gets the window the prompt leaves (at least half of
    it: a longer prompt keeps its last tokens). What sft.py logs, decoded as chat and serve
    decode."""
    return replies(model, tok, [ids], max_new_tokens, run, utf8, slots=1)[0]


def replies(model: GPT, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int, run: Runtime,
            utf8: bool = True, slots: int = 16) -> list[str]:
    """reply() for many prompts, decoded `slots` at a time as one batch (what eval.py scores)."""
    block = model.config.block_size
    # the prompt stays whole and the reply takes the rest of the window, up to max_new_tokens;
    # only a prompt that would leave the reply less than half the window (or max_new_tokens, if
    # smaller) loses its oldest tokens
    cut = [ids[-(block - min(max_new_tokens, max(block - len(ids), block // 2))):] for ids in prompts]
    constraint = utf8_constraint(tok, model.config.vocab_size, run.device) if utf8 else None
    out = sample_groups(model, tok, cut, 1, 0.0, 0, max_new_tokens, autocast=run.autocast, constraint=constraint,
                        slots=slots)
    return [turn_text(tok, ids) for ids in out]


def seeded(*key: int) -> torch.Generator:
    """A generator seeded by a tuple of ints (a run's seed, a question's draw, a reply...): the same
    key draws the same replies in any process, whatever else was drawn before."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


@torch.no_grad()
def sample_groups(model: GPT, tok, prompts: list[list[int]], n: int, temperature: float, top_k: int,
                  max_new_tokens: int, generators=None, autocast=None, constraint=None,
                  slots: int = 0) -> list[list[int]]:
    """n replies to each prompt (ids up to the assistant's start), decoded as one batch (at most
    `slots` rows at a time; 0: all); replies of prompt i are items i*n .. i*n + n - 1, each ending
    with its end-of-turn when it made one. generators[i*n + j] draws reply j of prompt i
    (temperature 0: greedy); constraint: utf8_constraint's, or None."""
    end = tok.token_id(END_OF_TURN)
    block = model.config.block_size
    was_training = model.training
    model.eval()  # no dropout: the replies are the policy's
    decoder = BatchDecoder(model, slots=min(slots or len(prompts) * n, max(1, len(prompts) * n)), chunk=block,
                           autocast=autocast)
    rows = []
    for i, ids in enumerate(prompts):
        budget = min(max_new_tokens, block - len(ids))
        if budget < 1:
            raise DataError(f"a question of {len(ids)} tokens leaves no room for a reply in block_size {block}")
        for j in range(n):
            g = generators[i * n + j] if generators is not None else None
            rows.append(decoder.add(ids, budget, temperature, top_k or None, generator=g, stop_tokens=(end,),
                                    constraint=constraint))
    decoder.run()
    model.train(was_training)
    return [row.ids[len(ids):] for row, ids in zip(rows, (p for p in prompts for _ in range(n)))]


def turn_text(tok: Tokenizer, ids: list[int]) -> str:
    """The text of a turn's tokens, up to its end-of-turn token if it has one."""
    end = tok.token_id(END_OF_TURN)
    return tok.decode(ids[:ids.index(end)] if end in ids else ids)


def chat_budget(block_size: int, max_new_tokens: int) -> int:
    """The tokens a chat's prompt (system turn, history, new message) may take: the reply keeps
    max_new_tokens of the window, at most half of it (sample.py --chat and serve.py alike)."""
    return block_size - min(max_new_tokens, block_size // 2)


def user_prompt(tok: Tokenizer, text: str) -> list[int]:
    """One user turn rendered up to the assistant's start."""
    return render_conversation(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
