"""
The danlu GPT: a decoder-only transformer written out by hand, with a KV cache and generate().

The default GPTConfig is the GPT-2 layout (learned positions, LayerNorm, GELU MLP, tied
embeddings), so runs compare directly with nanoGPT. Each switch in GPTConfig is a separate,
tested code path: rotary positions, RMSNorm, SwiGLU / ReLU^2 MLPs, grouped-query attention,
QK-norm, untied head, LoRA adapters, a mixture-of-experts MLP. Nothing here knows about data,
files or training loops.
References: GPT-2 (Radford et al. 2019), RoFormer (Su et al. 2021), GQA (Ainslie et al. 2023),
GLU variants (Shazeer 2020), Primer's ReLU^2 (So et al. 2021), QK-norm (Henry et al. 2020),
LoRA (Hu et al. 2021), Switch Transformer (Fedus et al. 2021), DeepSeekMoE (Dai et al. 2024).
"""
import dataclasses
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
# Where LoRA adapters may sit: attention's q, k, v projections (slices of the fused c_attn) and
# output (o), the MLP's input and output, and the vocabulary head.
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out", "head")


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
    # LoRA: a trainable low-rank update beside each targeted Linear; everything else is frozen
    lora_rank: int = setting(0, lo=0)  # 0: no adapters
    lora_alpha: float = setting(16.0, above=0.0)  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = setting(0.0, lo=0.0, below=1.0)  # on the adapters' input only
    lora_targets: str = "q,k,v,o,mlp_in,mlp_out"  # comma-separated, from LORA_TARGETS
    lora_new_tokens_from: int = setting(0, lo=0)  # ids >= this (tokens the base lacks, e.g. chat
    # tokens) train their embedding (and head) rows beside the adapters; 0: none. sft.py sets it.
    # mixture of experts: n_expert MLPs of width mlp_hidden per block, moe_top_k of them per token
    n_expert: int = setting(0, lo=0)  # 0: the dense MLP
    moe_top_k: int = setting(2, lo=1)
    moe_shared_expert: bool = setting(False, choices=(False, True))  # one more expert every token uses
    # softmax (Switch) or sigmoid (DeepSeek-V3) scores. Measured on Shakespeare-char (8 experts,
    # top 2, two runs of ~750 steps): val loss within 0.03 either way, sigmoid a little better
    # balanced (aux 1.01-1.02 vs 1.06); softmax is the default for being the common one
    # (Switch, Mixtral, Qwen-MoE) and for its plain probabilities, which the balancing loss uses.
    moe_router: str = setting("softmax", choices=("softmax", "sigmoid"))
    moe_aux_weight: float = setting(0.01, lo=0.0)  # weight of the load-balancing loss in training
    # classifiers (tiny_cls): "lm" reads the class token off the LM head at <CLS>; "mlp" puts a
    # head of its own on the <CLS> hidden state, trained on the class alone
    cls_head: str = setting("lm", choices=("lm", "mlp"))
    n_class: int = setting(0, lo=0)  # the mlp head's outputs; train.py takes the dataset's

    def __post_init__(self):
        check_settings(self)
        unknown = [t for t in self.lora_target_set() if t not in LORA_TARGETS]
        if unknown or (self.lora_rank and not self.lora_target_set()):
            raise ConfigError(f"lora_targets = {self.lora_targets!r}: {'unknown target ' + repr(unknown[0]) if unknown else 'empty'}; "
                              f"give a comma-separated list from {','.join(LORA_TARGETS)}", "lora_targets")
        if self.n_expert and self.moe_top_k > self.n_expert:
            raise ConfigError(f"moe_top_k = {self.moe_top_k} is more than n_expert = {self.n_expert}; "
                              "each token picks moe_top_k of the experts", "moe_top_k")
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or self.n_head % kv:
            raise ConfigError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and "
                              f"n_head by n_kv_head ({kv})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("rope needs an even head size (n_embd / n_head)")

    def lora_target_set(self) -> set[str]:
        return {t.strip() for t in self.lora_targets.split(",") if t.strip()}


def is_adapter(name: str) -> bool:
    """A parameter (or state dict key) that LoRA trains: an adapter or a new token's rows."""
    return any(part.startswith("lora_") for part in name.split("."))


class LoRALinear(nn.Linear):
    """nn.Linear plus low-rank updates on slices of its output (LoRA, Hu et al. 2021): columns
    start:stop of part p get scale * B_p A_p dropout(x), scale = alpha / rank. A starts random
    and B at zero, so a new adapter changes nothing until it trains. A fused Linear holds one
    update per part: c_attn's q, k, v slices (or swiglu's gate and up halves) each get their
    own, exactly as separate projections (Llama's q_proj, k_proj, v_proj) would."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parts: dict[str, tuple[int, int]],
                 rank: int, alpha: float, dropout: float):
        super().__init__(in_features, out_features, bias=bias)
        self.parts, self.scale = parts, alpha / rank
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, in_features)) for n in parts})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(b - a, rank)) for n, (a, b) in parts.items()})
        self.lora_dropout = nn.Dropout(dropout)
        self.reset_adapters()

    def reset_adapters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's own initial range
        for name in self.parts:
            nn.init.uniform_(self.lora_A[name], -bound, bound)
            nn.init.zeros_(self.lora_B[name])

    def forward(self, x: Tensor) -> Tensor:
        return self.add_updates(x, super().forward(x))

    def add_updates(self, x: Tensor, y: Tensor) -> Tensor:
        """y (..., out), the base output for x, plus every part's update."""
        h = self.lora_dropout(x)
        for name, (start, stop) in self.parts.items():
            delta = (h @ self.lora_A[name].t()) @ self.lora_B[name].t() * self.scale  # (..., stop - start)
            if stop - start == self.out_features:
                y = y + delta
            else:  # in place on the slice: no zero-padded full-width copy per part
                y[..., start:stop] += delta
        return y

    def merged_weight(self) -> Tensor:
        """The weight with every update folded in: W[start:stop] += scale * B A."""
        w = self.weight.detach().clone()
        for name, (start, stop) in self.parts.items():
            w[start:stop] += self.scale * (self.lora_B[name] @ self.lora_A[name]).detach().to(w.dtype)
        return w


def make_linear(config: GPTConfig, in_features: int, out_features: int, bias: bool,
                parts: dict[str, tuple[str, int, int]]) -> nn.Linear:
    """nn.Linear, or a LoRALinear with an update on each part (name -> (target, start, stop)
    of the output) whose target config.lora_targets names."""
    targets = config.lora_target_set() if config.lora_rank else set()
    chosen = {name: (a, b) for name, (target, a, b) in parts.items() if target in targets}
    if not chosen:
        return nn.Linear(in_features, out_features, bias=bias)
    return LoRALinear(in_features, out_features, bias, chosen, config.lora_rank, config.lora_alpha,
                      config.lora_dropout)


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
        q_dim, kv_dim = self.n_head * self.head_size, self.n_kv_head * self.head_size
        qkv = {"q": ("q", 0, q_dim), "k": ("k", q_dim, q_dim + kv_dim), "v": ("v", q_dim + kv_dim, q_dim + 2 * kv_dim)}
        self.c_attn = make_linear(config, config.n_embd, q_dim + 2 * kv_dim, config.bias or config.qkv_bias, qkv)
        self.c_proj = make_linear(config, config.n_embd, config.n_embd, config.bias, {"o": ("o", 0, config.n_embd)})
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
        # swiglu's halves are Llama's gate_proj and up_proj: one adapter each, as there
        fc_parts = ({"gate": ("mlp_in", 0, hidden), "up": ("mlp_in", hidden, fc_out)} if self.kind == "swiglu"
                    else {"mlp_in": ("mlp_in", 0, hidden)})
        self.c_fc = make_linear(config, config.n_embd, fc_out, config.bias, fc_parts)
        self.c_proj = make_linear(config, hidden, config.n_embd, config.bias, {"mlp_out": ("mlp_out", 0, config.n_embd)})
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


class MoE(nn.Module):
    """A mixture of experts in the MLP's place: a router scores n_expert MLPs per token, the
    token goes through its top_k and their outputs are summed, weighted by the gates. Dropless:
    every expert takes all the tokens routed to it, however many (no capacity, nothing
    dropped), so a token's output never depends on the rest of the batch. An optional shared
    expert sees every token (DeepSeekMoE). The router's probabilities and choices of the last
    forward stay in probs / chosen for the load-balancing loss (GPT.balance_loss)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_expert, self.top_k, self.kind = config.n_expert, config.moe_top_k, config.moe_router
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList([MLP(config) for _ in range(config.n_expert)])
        self.shared = MLP(config) if config.moe_shared_expert else None
        self.probs = self.chosen = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, C) -> gates (N, k), chosen experts (N, k), probabilities (N, E)."""
        logits = self.router(x).float()  # (N, E)
        if self.kind == "softmax":  # Switch / DeepSeek-V2: the gates are the top-k probabilities
            probs = F.softmax(logits, dim=-1)
            gates, chosen = probs.topk(self.top_k, dim=-1)
        else:  # DeepSeek-V3: independent sigmoid affinities, gates normalised over the chosen
            scores = torch.sigmoid(logits)
            top, chosen = scores.topk(self.top_k, dim=-1)
            gates, probs = top / top.sum(-1, keepdim=True), scores / scores.sum(-1, keepdim=True)
        return gates, chosen, probs

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        flat = x.reshape(-1, C)  # (N, C)
        gates, chosen, probs = self.route(flat)
        # Sort the N * k (token, expert) slots by expert: each expert runs once on its rows.
        # Every expert runs, also on zero rows, so each parameter is in the graph (DDP needs that).
        slots = chosen.reshape(-1)  # (N*k,)
        order = slots.argsort(stable=True)
        token = order // self.top_k  # the token of each sorted slot
        counts = torch.bincount(slots, minlength=self.n_expert).tolist()
        out = torch.cat([expert(rows) for expert, rows in zip(self.experts, flat[token].split(counts))])
        out = out * gates.reshape(-1)[order, None].to(out.dtype)  # (N*k, C)
        y = torch.zeros_like(flat).index_add_(0, token, out)  # each token: the sum of its k experts
        if self.shared is not None:
            y = y + self.shared(flat)
        self.probs, self.chosen = probs.view(B, T, -1), chosen.view(B, T, -1)
        return y.view(B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.bias, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config.n_embd, config.norm, config.bias, config.norm_eps)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

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
        self.lm_head = make_linear(config, config.n_embd, config.vocab_size, False,
                                   {"head": ("head", 0, config.vocab_size)})
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        # LoRA: the rows of tokens new to the base (chat tokens) would stay frozen at their
        # initial mean, alike for every new token; these deltas (zero at first) let them train
        new = config.vocab_size - config.lora_new_tokens_from
        if config.lora_rank and config.lora_new_tokens_from and new > 0:
            self.lora_wte = nn.Parameter(torch.zeros(new, config.n_embd))
            if not config.tie_embeddings:  # tied: the head's rows move with the embedding's
                self.lora_head = nn.Parameter(torch.zeros(new, config.n_embd))
        self.aux_loss = None  # MoE: the load-balancing loss of the last forward with targets
        if config.cls_head == "mlp":  # <CLS> state -> Linear -> GELU -> Linear -> classes
            if config.n_class < 1:
                raise ConfigError("cls_head = 'mlp' needs n_class >= 1; train.py takes it from a "
                                  "classification dataset (prepare/tiny_cls.py)", "n_class")
            if not config.tie_embeddings:  # an untied LM head never enters the class loss:
                self.lm_head.weight.requires_grad_(False)  # frozen, or DDP waits for its gradient
            hidden = max(1, config.n_embd // 2)
            self.cls_mlp = nn.Sequential(nn.Linear(config.n_embd, hidden), nn.GELU(),
                                         nn.Linear(hidden, config.n_class))
            # the class tokens' ids in class order: targets holding one are the classes to learn
            self.register_buffer("cls_ids", torch.zeros(config.n_class, dtype=torch.long))
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
            if isinstance(module, LoRALinear):
                module.reset_adapters()
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
        q k^T and att v, 12 * n_layer * n_embd * seq_len (PaLM appendix B). MoE: only the
        top_k experts a token uses count."""
        cfg = self.config
        T = seq_len or cfg.block_size
        active = self.num_params(non_embedding=True)
        if cfg.n_expert:
            expert = sum(p.numel() for p in self.transformer.h[0].mlp.experts[0].parameters())
            active -= cfg.n_layer * (cfg.n_expert - cfg.moe_top_k) * expert
        return 6 * active + 12 * cfg.n_layer * cfg.n_embd * T

    # ------------------------------------------------------------------ LoRA

    def adapter_state(self) -> dict:
        """The tensors a LoRA run trains and saves (the base is frozen and referenced)."""
        return {k: v for k, v in self.state_dict().items() if is_adapter(k)}

    def freeze_base(self) -> tuple[int, int]:
        """Only adapters train; returns (trainable, total) parameter counts."""
        for name, p in self.named_parameters():
            p.requires_grad = is_adapter(name)
        return sum(p.numel() for p in self.parameters() if p.requires_grad), self.num_params(False)

    def new_token_rows(self, idx: Tensor, rows: Tensor) -> Tensor:
        """rows[id - lora_new_tokens_from] for ids at or above it, zero below: (B, T, C)."""
        start = self.config.lora_new_tokens_from
        picked = F.embedding((idx - start).clamp(min=0), rows)
        return picked * (idx >= start).unsqueeze(-1).to(picked.dtype)

    @torch.no_grad()
    def merged(self) -> "GPT":
        """A plain model (lora_rank 0) computing what this one does, adapters folded into the
        weights. An adapted head on a tied embedding unties them (the embedding keeps its rows)."""
        cfg = self.config
        head_adapted = isinstance(self.lm_head, LoRALinear)
        plain = dataclasses.replace(cfg, lora_rank=0, lora_new_tokens_from=0,
                                    tie_embeddings=cfg.tie_embeddings and not head_adapted)
        state = {k: v.clone() for k, v in self.state_dict().items() if not is_adapter(k)}
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                state[name + ".weight"] = module.merged_weight()
        start = cfg.lora_new_tokens_from
        if hasattr(self, "lora_wte"):
            state["transformer.wte.weight"][start:] += self.lora_wte
            head_rows = self.lora_wte if cfg.tie_embeddings else self.lora_head
            state["lm_head.weight"][start:] += head_rows
        if plain.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        model = GPT(plain)
        model.load_state_dict(state)
        return model.to(self.lm_head.weight.device)

    # ------------------------------------------------------------------ MoE

    def balance_loss(self, mask: Tensor, reduction: str) -> Tensor:
        """The load-balancing loss of the last forward (Switch Transformer, per sequence as in
        DeepSeek-V3): per row, E * sum_e f_e P_e over the positions whose loss counts (mask
        (B, T), their weights), f_e the share of the row's top-k slots expert e took and P_e its
        mean router probability; 1 when balanced, E when one expert takes everything; averaged
        over layers. "sum" weighs each row by its count, like the cross-entropy sum, so the
        training loop's division by the step's target count makes it a mean per target that
        micro-batching and processes do not change; "mean" divides by the count here."""
        E, k = self.config.n_expert, self.config.moe_top_k
        mask = mask.float()
        n = mask.sum(1)  # (B,)
        total = torch.zeros((), device=mask.device)
        for block in self.transformer.h:
            picked = F.one_hot(block.mlp.chosen, E).sum(2).float()  # (B, T, E)
            f = (mask.unsqueeze(-1) * picked).sum(1) / (k * n.clamp(min=1e-8)).unsqueeze(-1)  # (B, E)
            P = (mask.unsqueeze(-1) * block.mlp.probs).sum(1) / n.clamp(min=1e-8).unsqueeze(-1)  # (B, E)
            total = total + (E * (f * P).sum(1) * n).sum()
        total = total / self.config.n_layer
        return total if reduction == "sum" else total / n.sum().clamp(min=1e-8)

    # ------------------------------------------------------------------ forward

    def body(self, idx: Tensor, caches=None, pos: int = 0) -> Tensor:
        """Token ids (B, T) at positions pos .. pos+T-1 -> final hidden states (B, T, C)."""
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if hasattr(self, "lora_wte"):
            x = x + self.new_token_rows(idx, self.lora_wte)
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
        if hasattr(self, "lora_wte"):
            # the new tokens' trained rows join the head's weight (V, C) rather than adding a
            # second (B, T, V) logits tensor, which for a 50k vocabulary is the larger one
            start, w = self.config.lora_new_tokens_from, self.lm_head.weight
            rows = self.lora_wte if self.config.tie_embeddings else self.lora_head
            logits = F.linear(x, torch.cat([w[:start], w[start:] + rows.to(w.dtype)]))
            if isinstance(self.lm_head, LoRALinear):
                logits = self.lm_head.add_updates(x, logits)
        else:
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
        most of a small model's work. Finding those positions costs one host sync.
        An MoE model leaves its load-balancing loss, reduced the same way, in self.aux_loss
        (not in the returned loss: that is the cross-entropy evaluations compare)."""
        h = self.body(idx)
        if targets is None:
            return self.head(h), None
        if self.config.n_expert:
            counted = (targets != -1) if weights is None else weights
            self.aux_loss = self.balance_loss(counted, reduction)
        if self.config.cls_head == "mlp":
            return None if loss_only else self.head(h), self.class_loss(h, targets, reduction)
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

    def class_loss(self, h: Tensor, targets: Tensor, reduction: str) -> Tensor:
        """The mlp head's cross-entropy at the positions whose target is a class token (the
        <CLS> position): one target per example, whatever else targets holds."""
        is_class = torch.isin(targets, self.cls_ids)  # (B, T)
        labels = (targets[is_class].unsqueeze(1) == self.cls_ids).int().argmax(1)  # (N,) class index
        logits = self.cls_mlp(h[is_class]).float()  # (N, n_class)
        return F.cross_entropy(logits, labels, reduction=reduction)

    def target_count(self, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        """How many targets forward()'s summed loss covers, for the training loop's mean: the
        weights' sum (or the targets that are not -1); with the mlp head, one per example."""
        if self.config.cls_head == "mlp":
            return torch.isin(targets, self.cls_ids).sum()
        return (targets != -1).sum() if weights is None else weights.sum()

    # ------------------------------------------------------------------ generation

    def make_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        p = self.lm_head.weight
        cfg = self.config
        return [KVCache(batch_size, cfg.n_kv_head or cfg.n_head, max_len, cfg.n_embd // cfg.n_head,
                        p.dtype, p.device) for _ in range(cfg.n_layer)]

    @torch.no_grad()
    def generate_stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
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
        block = self.config.block_size
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
                    x = self.body(idx[:, -1:], caches, pos)  # one new position
                    pos += 1
                else:  # the first step, a full cache (shift), or no cache at all
                    context = idx[:, -(block if caches is None else keep):]
                    if use_cache:
                        caches = caches or self.make_caches(idx.size(0), min(block, idx.size(1) + max_new_tokens))
                    x = self.body(context, caches if use_cache else None, 0)
                    pos = context.size(1)
            logits = self.head(x[:, -1, :]).float()  # (B, V)
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
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, stop_tokens=(),
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 constraint: Tensor | None = None) -> Tensor:
        """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens; temperature 0 is greedy."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        stop_tokens, use_cache, generator, constraint))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


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


def grow_vocab(model: GPT, vocab_size: int, new_ids: range) -> GPT:
    """The same model with vocab_size rows in wte and lm_head (tied or not). Rows of new_ids
    (which may include the old padding rows) start at the mean of the trained rows below
    new_ids.start, so a new token begins as an 'average' token rather than a random one;
    every other row is kept, so logits of old tokens do not change."""
    old = model.config.vocab_size
    if vocab_size <= old and len(new_ids) == 0:
        return model
    grown = GPT(dataclasses.replace(model.config, vocab_size=max(old, vocab_size)))
    state = model.state_dict()
    for key in ("transformer.wte.weight", "lm_head.weight"):
        w = state[key]  # (old, C); with tied embeddings both keys hold the same matrix
        mean = w[:new_ids.start].mean(dim=0)
        rows = torch.cat([w, mean.expand(grown.config.vocab_size - old, -1)])
        rows[new_ids.start:new_ids.stop] = mean
        state[key] = rows
    grown.load_state_dict(state)
    return grown



def add_adapters(model: GPT, config: GPTConfig, adapters: dict | None = None) -> GPT:
    """A model of config (model's, plus lora_* keys) holding model's weights, frozen, with LoRA
    adapters: adapters' tensors (a LoRA checkpoint's) or new ones (A random, B zero)."""
    lora = GPT(config).to(model.lm_head.weight.device)
    missing, unexpected = lora.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(is_adapter(k) for k in missing):
        raise ValueError(f"add_adapters: the base does not fit config ({unexpected[:2] or missing[:2]})")
    if adapters is not None:
        if sorted(adapters) != sorted(missing):
            wrong = sorted(set(adapters) ^ set(missing))
            raise ValueError(f"the adapters do not fit this model's lora_targets ({wrong[:3]}...)")
        lora.load_state_dict(adapters, strict=False)
    lora.freeze_base()
    return lora


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
