"""
The danlu GPT: a decoder-only transformer written out by hand, with a KV cache and generate().

The default GPTConfig is the GPT-2 layout (learned positions, LayerNorm, GELU MLP, tied
embeddings), so runs compare directly with nanoGPT. Each switch in GPTConfig is a separate,
tested code path: rotary positions, RMSNorm, SwiGLU / ReLU^2 MLPs, grouped-query attention,
QK-norm, untied head, a mixture-of-experts MLP, a classification head. Nothing here knows about
adapters (lora.py), decoding policy (engine.py), data, files or training loops. (~480 lines
where ~450 was the aim: a CPU dropout of its own, 1.7x a CPU training step with dropout.)
References: GPT-2 (Radford et al. 2019), RoFormer (Su et al. 2021), GQA (Ainslie et al. 2023),
GLU variants (Shazeer 2020), Primer's ReLU^2 (So et al. 2021), QK-norm (Henry et al. 2020),
Switch Transformer (Fedus et al. 2021), DeepSeekMoE (Dai et al. 2024).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from settings import ConfigError, check_settings, from_keys, setting


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
    # mixture of experts: n_expert MLPs of width mlp_hidden per block, moe_top_k of them per token
    n_expert: int = setting(0, lo=0)  # 0: the dense MLP
    moe_top_k: int = setting(2, lo=1)
    moe_shared_expert: bool = setting(False, choices=(False, True))  # one more expert every token uses
    # softmax (Switch, Mixtral) gates or sigmoid (DeepSeek-V3) ones; docs/lab-notes.md compares them
    moe_router: str = setting("softmax", choices=("softmax", "sigmoid"))
    moe_aux_weight: float = setting(0.01, lo=0.0)  # weight of the load-balancing loss in training
    # classifiers (tiny_cls): "lm" reads the class token off the LM head at <CLS>; "mlp" puts a
    # head of its own on the <CLS> hidden state, trained on the class alone
    cls_head: str = setting("lm", choices=("lm", "mlp"))
    n_class: int = setting(0, lo=0)  # the mlp head's outputs; train.py takes the dataset's

    def __post_init__(self):
        check_settings(self)
        if self.n_expert and self.moe_top_k > self.n_expert:
            raise ConfigError(f"moe_top_k = {self.moe_top_k} is more than n_expert = {self.n_expert}; "
                              "each token picks moe_top_k of the experts", "moe_top_k")
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or self.n_head % kv:
            raise ConfigError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and "
                              f"n_head by n_kv_head ({kv})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("rope needs an even head size (n_embd / n_head)")


def gpt_config(source, **changes) -> GPTConfig:
    """The one way to build a GPTConfig: from a checkpoint's model_config dict or any config
    object holding the GPTConfig keys (train's, sft's), other keys ignored, then `changes`."""
    return from_keys(GPTConfig, source, **changes)


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
            # the weight in x's dtype: under bf16 autocast torch's fused kernel needs them alike
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), eps=self.eps)
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


class CPUDropout(torch.autograd.Function):
    """Dropout whose mask is 16 random bits per element, kept when they reach p * 2^16 (p is
    rounded to 1/65536): torch's per-element Bernoulli draw took a quarter of a CPU step of
    nanoGPT's recipe (dropout 0.2); 64-bit random words cut into four are ~4x cheaper."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
        keep = (bits.view(torch.int16)[:x.numel()] >= round(p * 65536) - 32768).view(x.shape)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.mul(ctx.saved_tensors[0]).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout; on a CPU with CPUDropout's mask (GPUs and torch.compile fuse their own)."""
    cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    return x if not training or p == 0 else CPUDropout.apply(x, p) if cpu else F.dropout(x, p)


class Dropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated for max_len positions."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_size: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: Tensor, v: Tensor, pos) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nkv, T, hs) at positions pos.. and return the keys and values so far.
        pos a LongTensor (B,) (T == 1, a batched decode step): row b writes at its own pos[b],
        and the keys up to the largest pos come back (the caller masks each row's tail)."""
        if isinstance(pos, Tensor):
            rows = torch.arange(k.size(0), device=k.device)
            self.k[rows, :, pos], self.v[rows, :, pos] = k[:, :, 0], v[:, :, 0]
            S = int(pos.max()) + 1
            return self.k[:, :, :S], self.v[:, :, :S]
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
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = Norm(self.head_size, "rmsnorm") if config.qk_norm else None
        self.k_norm = Norm(self.head_size, "rmsnorm") if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)
        self.attn_impl = config.attn_impl

    def forward(self, x: Tensor, rope=None, cache: KVCache | None = None, pos: int | Tensor = 0) -> Tensor:
        """pos: where x starts; a LongTensor (B,) for one position per row, each at its own."""
        B, T, C = x.size()
        hs, nh, nkv = self.head_size, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        per_row = isinstance(pos, Tensor)
        if rope is not None:
            if per_row:  # (B, 1, 1, hs/2): each row's own angles
                cos, sin = rope[0][pos][:, None, None], rope[1][pos][:, None, None]
            else:
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
        if per_row:  # row b sees keys 0 .. pos[b]: (B, 1, 1, S)
            mask = (torch.arange(S, device=x.device) <= pos[:, None])[:, None, None]
        elif pos > 0 and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        # with T == 1 the causal mask is a no-op; a plain bool keeps torch.export happy
        causal = not per_row and pos == 0
        dropout = self.dropout if self.training else 0.0
        if self.attn_impl == "sdpa" and not (dropout and x.device.type == "cpu"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        else:  # CPU SDPA with dropout runs a math path too; this one's dropout mask is cheaper
            y = self._math_attention(q, k, v, mask, causal, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _math_attention(q, k, v, mask, causal, p: float) -> Tensor:
        """softmax(q k^T / sqrt(hs)) v, spelled out: the reference for the fused kernel, and on
        a CPU the faster way to train with dropout (SDPA's own math path there is ~2x slower)."""
        B, nh, T, hs = q.shape
        S = k.size(2)
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
        if mask is not None:  # (T, S), or (B, 1, 1, S) with T == 1: one row per batch row
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = bias if bias.dim() == 2 else bias.expand(B, nh, 1, S).reshape(B * nh, 1, S)
        # the scale and the mask go in with the matmul (baddbmm) instead of two passes over att
        att = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                            alpha=1.0 / math.sqrt(hs))  # (B * nh, T, S)
        att = dropout(F.softmax(att, dim=-1), p)
        return (att @ v.reshape(B * nh, S, hs)).view(B, nh, T, hs)


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
        self.dropout = Dropout(config.dropout)

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
    forward stay in probs / chosen for the load-balancing loss (train.balance_loss)."""

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

    def forward(self, x: Tensor, rope=None, cache=None, pos: int | Tensor = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=Dropout(config.dropout),
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
        self.init_weights()

    def init_weights(self, init=None) -> None:
        """GPT-2's initialisation: N(0, 0.02) for every matrix (init_module, or init for each
        module), the residual projections scaled by 1/sqrt(2 * n_layer) so the residual
        stream's variance does not grow with depth."""
        self.apply(init or self.init_module)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def init_module(module: nn.Module) -> None:
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
        q k^T and att v, 12 * n_layer * n_embd * seq_len (PaLM appendix B). MoE: only the
        top_k experts a token uses count."""
        cfg = self.config
        T = seq_len or cfg.block_size
        active = self.num_params(non_embedding=True)
        if cfg.n_expert:
            expert = sum(p.numel() for p in self.transformer.h[0].mlp.experts[0].parameters())
            active -= cfg.n_layer * (cfg.n_expert - cfg.moe_top_k) * expert
        return 6 * active + 12 * cfg.n_layer * cfg.n_embd * T

    # ------------------------------------------------------------------ forward

    def body(self, idx: Tensor, caches=None, pos: int | Tensor = 0) -> Tensor:
        """Token ids (B, T) at positions pos .. pos+T-1 -> final hidden states (B, T, C).
        pos a LongTensor (B,) with T == 1 and caches: a batched decode step, row b at pos[b]."""
        B, T = idx.size()
        per_row = isinstance(pos, Tensor)
        last = int(pos.max()) if per_row else pos
        if per_row and (T != 1 or caches is None):
            raise ValueError("per-row positions take one token per row, and a cache")
        if last + T > self.config.block_size:
            raise ValueError(f"sequence of {last + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + (self.transformer.wpe(pos)[:, None] if per_row else
                     self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device)))
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

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """logits (B, T, V) and, given targets (B, T) with -1 = ignore, the mean cross-entropy
        (the mlp head: its class loss). Training's weighted sums are train.py's Objective."""
        h = self.body(idx)
        logits = self.head(h)
        if targets is None:
            return logits, None
        if self.config.cls_head == "mlp":
            return logits, self.class_loss(h, targets)
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def class_loss(self, h: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """The mlp head's cross-entropy at the positions whose target is a class token (the
        <CLS> position): one target per example, whatever else targets holds."""
        is_class = torch.isin(targets, self.cls_ids)  # (B, T)
        labels = (targets[is_class].unsqueeze(1) == self.cls_ids).int().argmax(1)  # (N,) class index
        logits = self.cls_mlp(h[is_class]).float()  # (N, n_class)
        return F.cross_entropy(logits, labels, reduction=reduction)

    # ------------------------------------------------------------------ generation

    def make_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        cfg, p = self.config, self.lm_head.weight
        return [KVCache(batch_size, cfg.n_kv_head or cfg.n_head, max_len, cfg.n_embd // cfg.n_head,
                        p.dtype, p.device) for _ in range(cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """idx (B, T) -> (B, T + max_new_tokens): nanoGPT's sampling loop (temperature 0: greedy)
        with a KV cache while the window has room, then nanoGPT's crop. The product decodes with
        engine.py (stop tokens, top_p, constraints, context shift); this is its reference."""
        block = self.config.block_size
        caches = self.make_caches(idx.size(0), min(block, idx.size(1) + max_new_tokens))
        pos = 0
        for _ in range(max_new_tokens):
            if 0 < pos < caches[0].k.size(2):
                x = self.body(idx[:, -1:], caches, pos)  # one new position
                pos += 1
            else:  # the prompt, or the window is full: no cache past it
                context = idx[:, -block:]
                x = self.body(context, caches if pos == 0 else None, 0)
                pos = context.size(1) if pos == 0 else pos
            logits = self.head(x[:, -1, :]).float()  # (B, V)
            if temperature <= 0:
                next_token = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None and 0 < top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
        return idx
