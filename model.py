"""
The danlu GPT: a decoder-only transformer written out by hand, with a KV cache and generate().

The default GPTConfig is the GPT-2 layout (learned positions, LayerNorm, GELU MLP, tied
embeddings), so runs compare directly with nanoGPT. Each switch in GPTConfig is a separate,
tested code path: rotary positions, RMSNorm, SwiGLU / ReLU^2 MLPs, grouped-query attention,
QK-norm, untied head. Nothing here knows about data, files or training loops.
References: GPT-2 (Radford et al. 2019), RoFormer (Su et al. 2021), GQA (Ainslie et al. 2023),
GLU variants (Shazeer 2020), Primer's ReLU^2 (So et al. 2021), QK-norm (Henry et al. 2020).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Decoding changes the key length every step; cuDNN attention builds a new plan for each new
# length, which made bf16 generation on an H100 ~20x slower (17-26 tok/s). Decode without it.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ConfigError(ValueError):
    """A config value that cannot work; .key names the offending key (None for a combination)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def setting(default, *, lo=None, hi=None, above=None, below=None, choices=None):
    """A config field whose valid values sit beside its default: lo <= v <= hi, above < v < below,
    or v in choices. Every config class (GPTConfig, train's, sft's, sample's, ...) is checked by
    check_settings() when it is built, so a bad value fails before anything runs."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "above": above, "below": below,
                                            "choices": choices})


def check_settings(cfg) -> None:
    """Raise ConfigError naming the first field of dataclass cfg outside its valid values."""
    for f in fields(cfg):
        # a subclass that re-declares a field to change its default keeps the parent's limits
        v, m = getattr(cfg, f.name), next(
            (g.metadata for c in type(cfg).__mro__ for g in getattr(c, "__dataclass_fields__", {}).values()
             if g.name == f.name and g.metadata), {})
        bad = None
        if isinstance(v, float) and not math.isfinite(v):
            bad = "must be a finite number"
        elif m.get("choices") is not None and v not in m["choices"]:
            bad = "choose one of " + ", ".join(map(str, m["choices"]))
        else:
            limits = [(m.get("lo"), ">=", lambda a, b: a >= b), (m.get("above"), ">", lambda a, b: a > b),
                      (m.get("hi"), "<=", lambda a, b: a <= b), (m.get("below"), "<", lambda a, b: a < b)]
            failed = [f"{op} {limit}" for limit, op, ok in limits if limit is not None and not ok(v, limit)]
            if failed:
                wanted = " and ".join(f"{op} {limit}" for limit, op, _ in limits if limit is not None)
                bad = f"must be {wanted}"
        if bad:
            raise ConfigError(f"{f.name} = {v!r}: {bad}", key=f.name)


@dataclass
class GPTConfig:
    block_size: int = setting(1024, lo=1)
    vocab_size: int = setting(50304, lo=1)  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = setting(12, lo=1)
    n_head: int = setting(12, lo=1)
    n_embd: int = setting(768, lo=1)
    n_kv_head: int = setting(0, lo=0)  # 0: same as n_head; fewer: grouped-query attention
    mlp_hidden: int = setting(0, lo=0)  # 0: 4 * n_embd (swiglu: 8/3 * n_embd, same parameters)
    dropout: float = setting(0.0, lo=0.0, below=1.0)
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    qkv_bias: bool = setting(False, choices=(False, True))  # q/k/v biases even when bias is off (Qwen2)
    norm_eps: float = setting(0.0, lo=0.0)  # 0: 1e-5 for layernorm, 1e-6 for rmsnorm
    pos_emb: str = setting("learned", choices=("learned", "rope"))
    rope_theta: float = setting(10000.0, above=0.0)
    norm: str = setting("layernorm", choices=("layernorm", "rmsnorm"))
    mlp: str = setting("gelu", choices=("gelu", "gelu_tanh", "swiglu", "relu2"))  # gelu_tanh: GPT-2's
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    logit_softcap: float = setting(0.0, lo=0.0)  # >0: logits = c * tanh(logits / c)
    attn_impl: str = setting("sdpa", choices=("sdpa", "math"))  # math: plain matmul-softmax

    def __post_init__(self):
        check_settings(self)
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or self.n_head % kv:
            raise ConfigError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and "
                              f"n_head by n_kv_head ({kv})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("rope needs an even head size (n_embd / n_head)")


class Norm(nn.Module):
    """LayerNorm (optional bias) or RMSNorm, with a learned gain; eps 0 takes the kind's usual
    value (1e-5 LayerNorm, 1e-6 RMSNorm). Imported models bring their own eps."""

    def __init__(self, dim: int, kind: str = "layernorm", bias: bool = True, eps: float = 0.0):
        super().__init__()
        self.kind = kind
        self.eps = eps or (1e-6 if kind == "rmsnorm" else 1e-5)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.weight.shape, self.weight, eps=self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=self.eps)


def rope_tables(head_size: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, each (max_len, head_size // 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, nh, T, hs) by per-position angles (T, hs/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    y = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return y.type_as(x)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated for max_len positions."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_size: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        T = k.size(2)
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_size = config.n_embd // config.n_head
        # one fused projection for q, k, v; with GQA k and v have fewer heads than q
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = Norm(self.head_size, "rmsnorm") if config.qk_norm else None
        self.k_norm = Norm(self.head_size, "rmsnorm") if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_impl = config.attn_impl

    def forward(self, x: Tensor, rope=None, cache: KVCache | None = None, pos: int = 0) -> Tensor:
        B, T, C = x.size()
        hs, nh, nkv = self.head_size, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[0][pos:pos + T], rope[1][pos:pos + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, pos)  # (B, nkv, pos + T, hs)
        if nkv != nh:  # each group of nh / nkv query heads shares one key/value head
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        # Query i sits at absolute position pos + i and may see keys 0 .. pos + i.
        S = k.size(2)
        mask = None
        if pos > 0 and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        causal = pos == 0  # with T == 1 the causal mask is a no-op; a plain bool keeps torch.export happy
        dropout = self.dropout if self.training else 0.0
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        else:
            y = self._math_attention(q, k, v, mask, causal, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _math_attention(q, k, v, mask, causal, dropout) -> Tensor:
        """softmax(q k^T / sqrt(hs)) v, spelled out; the reference for the fused kernel."""
        T, S = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), p=dropout)
        return att @ v  # (B, nh, T, hs)


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden or 4 * config.n_embd
        if self.kind == "swiglu" and not config.mlp_hidden:
            # three matrices instead of two: shrink the hidden width to keep the parameters equal
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        fc_out = 2 * hidden if self.kind == "swiglu" else hidden  # swiglu: gate and value fused
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":  # GPT-2's approximation; imported GPT-2 weights expect it
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.bias, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config.n_embd, config.norm, config.bias, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope=None, cache=None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config.n_embd, config.norm, config.bias, config.norm_eps),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting a tied matrix once; non_embedding drops the position table (and
        the token table when it is not reused as the head, since a lookup costs no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention's
        q k^T and att v, 12 * n_layer * n_embd * seq_len (PaLM appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    # ------------------------------------------------------------------ forward

    def body(self, idx: Tensor, caches=None, pos: int = 0) -> Tensor:
        """Token ids (B, T) at positions pos .. pos+T-1 -> final hidden states (B, T, C)."""
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, caches[i] if caches is not None else None, pos)
        return self.transformer.ln_f(x)

    def head(self, x: Tensor) -> Tensor:
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.logit_softcap > 0:
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def forward(self, idx: Tensor, targets: Tensor | None = None, weights: Tensor | None = None,
                loss_only: bool = False, reduction: str = "mean"):
        """logits (B, T, V) and, given targets (B, T) with -1 = ignore, the mean cross-entropy;
        with weights (B, T), the weighted mean sum(w * ce) / sum(w). reduction="sum" returns the
        (weighted) sum instead, 0 when nothing counts: the training loop divides by the targets
        of the whole optimizer step, so a short answer weighs as much per token as a long one.
        loss_only (the training loop
        on example datasets) returns logits None and applies the head only at the positions that
        count: in SFT most positions are prompt or padding, and with a 50k vocabulary the head is
        most of a small model's work. Finding those positions costs one host sync."""
        h = self.body(idx)
        if targets is None:
            return self.head(h), None
        targets = targets.reshape(-1)
        w = None if weights is None else weights.reshape(-1).float()
        if loss_only:
            rows = ((targets != -1) if w is None else (w > 0)).nonzero().squeeze(1)  # (N,)
            targets, w = targets[rows], None if w is None else w[rows]
            logits, flat = None, self.head(h.reshape(-1, h.size(-1))[rows]).float()  # (N, V)
        else:
            logits = self.head(h)
            flat = logits.float().view(-1, logits.size(-1))  # (B*T, V)
        if w is None:
            return logits, F.cross_entropy(flat, targets, ignore_index=-1, reduction=reduction)
        total = (F.cross_entropy(flat, targets, ignore_index=-1, reduction="none") * w).sum()
        return logits, total if reduction == "sum" else total / w.sum().clamp(min=1e-8)

    # ------------------------------------------------------------------ generation

    def make_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        p = self.lm_head.weight
        cfg = self.config
        return [KVCache(batch_size, cfg.n_kv_head or cfg.n_head, max_len, cfg.n_embd // cfg.n_head,
                        p.dtype, p.device) for _ in range(cfg.n_layer)]

    @torch.no_grad()
    def generate_stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float = 1.0, stop_tokens=(),
                        use_cache: bool = True, generator: torch.Generator | None = None):
        """Yield the next token of each row (B,) for up to max_new_tokens steps, stopping early
        once every row has produced a stop token (a finished row repeats its stop token).
        With the cache each step runs one position; once the context fills block_size the
        window slides and is recomputed, exactly as generation without the cache does."""
        block = self.config.block_size
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        caches, pos = None, 0
        for _ in range(max_new_tokens):
            with sdpa_kernel(DECODE_BACKENDS):
                if caches is not None and pos < caches[0].k.size(2):
                    x = self.body(idx[:, -1:], caches, pos)  # one new position
                    pos += 1
                else:
                    context = idx[:, -block:]
                    caches = None
                    if use_cache and context.size(1) < block:
                        caches = self.make_caches(idx.size(0), min(block, idx.size(1) + max_new_tokens))
                    x = self.body(context, caches, 0)
                    pos = context.size(1)
            logits = self.head(x[:, -1, :]).float()  # (B, V)
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            if stop.numel():
                next_token = torch.where(done, idx[:, -1], next_token)
                done |= torch.isin(next_token, stop)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            yield next_token
            if stop.numel() and bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, stop_tokens=(),
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens; temperature 0 is greedy."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        stop_tokens, use_cache, generator))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else softmax(logits / t)
    restricted to the top_k most likely tokens and the smallest set holding top_p of the mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
