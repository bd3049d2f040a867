"""
LoRA (Hu et al. 2021) put into a GPT that is already built: each targeted nn.Linear is swapped
for a LoRALinear holding the same weight plus low-rank updates, the way peft and gpt-fast's
quantization change a model after construction; model.py never learns about adapters. Also the
rows of tokens new to the base (chat tokens), merging the adapters back into plain weights, and
the adapter state a LoRA run saves.

    model = GPT(config); model.load_state_dict(base)     # the plain, pretrained model
    model = add_adapters(model, LoRAConfig(lora_rank=8))  # frozen base + trainable adapters
    plain = merge(model)                                  # adapters folded into the weights
"""
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import GPT
from settings import ConfigError, check_settings, from_keys, setting

# Where adapters may sit: attention's q, k, v projections (slices of the fused c_attn) and
# output (o), the MLP's input and output, and the vocabulary head.
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out", "head")
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_new_tokens_from")


@dataclass
class LoRAConfig:
    # LoRA: a trainable low-rank update beside each targeted Linear; everything else is frozen
    lora_rank: int = setting(0, lo=0)  # 0: no adapters
    lora_alpha: float = setting(16.0, above=0.0)  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = setting(0.0, lo=0.0, below=1.0)  # on the adapters' input only
    lora_targets: str = "q,k,v,o,mlp_in,mlp_out"  # comma-separated, from q,k,v,o,mlp_in,mlp_out,head
    lora_new_tokens_from: int = setting(0, lo=0)  # ids >= this train their rows too (sft.py sets it)

    def __post_init__(self):
        check_settings(self)
        check_lora(self)

    def target_set(self) -> set[str]:
        return target_set(self)


def target_set(cfg) -> set[str]:
    return {t.strip() for t in cfg.lora_targets.split(",") if t.strip()}


def check_lora(cfg) -> None:
    """ConfigError for lora_targets that name no known target (any config holding the keys)."""
    unknown = [t for t in target_set(cfg) if t not in LORA_TARGETS]
    if unknown or (cfg.lora_rank and not target_set(cfg)):
        what = f"unknown target {unknown[0]!r}" if unknown else "empty"
        raise ConfigError(f"lora_targets = {cfg.lora_targets!r}: {what}; give a comma-separated list from "
                          f"{','.join(LORA_TARGETS)}", "lora_targets")


def lora_config(source, **changes) -> LoRAConfig:
    """The LoRA keys of a dict (a checkpoint's "lora") or of any config holding them."""
    return from_keys(LoRAConfig, source, **changes)


def is_adapter(name: str) -> bool:
    """A parameter (or state dict key) that LoRA trains: an adapter or a new token's rows."""
    return any(part.startswith("lora_") for part in name.split("."))


class LoRALinear(nn.Linear):
    """nn.Linear plus low-rank updates on slices of its output: columns start:stop of part p get
    scale * B_p A_p dropout(x), scale = alpha / rank. A starts random and B at zero, so a new
    adapter changes nothing until it trains. A fused Linear holds one update per part: c_attn's
    q, k, v slices (or swiglu's gate and up halves) each get their own, exactly as separate
    projections (Llama's q_proj, k_proj, v_proj) would. As the vocabulary head it may also hold
    trainable rows for the ids from new_from on (tokens the base lacks)."""

    def __init__(self, base: nn.Linear, parts: dict[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float, new_rows: nn.Parameter | None = None, new_from: int = 0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same tensors: a tied head stays tied
        self.parts, self.scale = parts, alpha / max(rank, 1)
        device = base.weight.device
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, self.in_features, device=device))
                                        for n in parts})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(b - a, rank, device=device))
                                        for n, (a, b) in parts.items()})
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_rows, self.new_from = new_rows, new_from
        self.reset_adapters()

    def reset_adapters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's own initial range
        for name in self.parts:
            nn.init.uniform_(self.lora_A[name], -bound, bound)
            nn.init.zeros_(self.lora_B[name])

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_rows is None:
            y = super().forward(x)
        else:  # the new rows join the weight (V, C) rather than adding a second (B, T, V) logits tensor
            w, start = self.weight, self.new_from
            y = F.linear(x, torch.cat([w[:start], w[start:] + self.lora_rows.to(w.dtype)]), self.bias)
        return self.add_updates(x, y) if self.parts else y

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


class LoRAEmbedding(nn.Embedding):
    """The token embedding plus trainable rows for ids from new_from on: without them the new
    tokens' rows would stay frozen at their initial mean, alike for every new token."""

    def __init__(self, base: nn.Embedding, new_rows: nn.Parameter, new_from: int):
        super().__init__(base.num_embeddings, base.embedding_dim, _weight=base.weight)
        self.weight = base.weight
        self.lora_rows, self.new_from = new_rows, new_from

    def forward(self, idx: Tensor) -> Tensor:
        x = super().forward(idx)  # (B, T, C)
        picked = F.embedding((idx - self.new_from).clamp(min=0), self.lora_rows)
        return x + picked * (idx >= self.new_from).unsqueeze(-1).to(picked.dtype)


def linear_parts(model: GPT) -> dict[str, tuple[nn.Linear, dict[str, tuple[str, int, int]]]]:
    """{module name: (the Linear, {part: (target, start, stop) of its output})} for every Linear
    an adapter may take: the fused q/k/v projection in three slices, swiglu's fused gate and up."""
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    q_dim, kv_dim = cfg.n_head * hs, (cfg.n_kv_head or cfg.n_head) * hs
    found = {"lm_head": (model.lm_head, {"head": ("head", 0, cfg.vocab_size)})}
    for name, m in model.named_modules():
        if name.endswith("attn.c_attn"):
            found[name] = (m, {"q": ("q", 0, q_dim), "k": ("k", q_dim, q_dim + kv_dim),
                               "v": ("v", q_dim + kv_dim, q_dim + 2 * kv_dim)})
        elif name.endswith("attn.c_proj"):
            found[name] = (m, {"o": ("o", 0, cfg.n_embd)})
        elif name.endswith("mlp.c_fc") or ".experts." in name and name.endswith("c_fc") or name.endswith("shared.c_fc"):
            half = m.out_features // 2  # swiglu's halves are Llama's gate_proj and up_proj: one adapter each
            found[name] = (m, {"gate": ("mlp_in", 0, half), "up": ("mlp_in", half, m.out_features)}
                           if cfg.mlp == "swiglu" else {"mlp_in": ("mlp_in", 0, m.out_features)})
        elif name.endswith("c_proj") and "mlp" in name:
            found[name] = (m, {"mlp_out": ("mlp_out", 0, cfg.n_embd)})
    return found


def add_adapters(model: GPT, cfg: LoRAConfig, adapters: dict | None = None) -> GPT:
    """model, frozen, with LoRA adapters swapped into the Linears cfg.lora_targets names (and
    trainable rows for the ids from lora_new_tokens_from on): the adapters' tensors (a LoRA
    checkpoint's) or new ones (A random, B zero, rows zero), so nothing changes until they train."""
    targets, start = cfg.target_set(), cfg.lora_new_tokens_from
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = model.config.vocab_size - start
    with torch.random.fork_rng(devices=[]):  # building the modules draws nothing; redraw() below does
        rows = None
        if start and new > 0:
            rows = nn.Parameter(torch.zeros(new, model.config.n_embd, device=model.lm_head.weight.device))
            model.transformer["wte"] = LoRAEmbedding(model.transformer.wte, rows, start)
        head_rows = rows if model.config.tie_embeddings or rows is None else nn.Parameter(torch.zeros_like(rows))
        for name, (linear, parts) in linear_parts(model).items():
            chosen = {p: (a, b) for p, (target, a, b) in parts.items() if target in targets}
            for p, (a, b) in chosen.items():
                if cfg.lora_rank > min(linear.in_features, b - a):
                    raise ConfigError(f"lora_rank = {cfg.lora_rank} is larger than {name}'s {p} "
                                      f"({linear.in_features} -> {b - a}); a low-rank update needs a rank below "
                                      "both: lower lora_rank", "lora_rank")
            extra = name == "lm_head" and head_rows is not None
            if chosen or extra:
                parent, _, leaf = name.rpartition(".")
                swapped = LoRALinear(linear, chosen, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                     head_rows if extra else None, start)
                setattr(model.get_submodule(parent) if parent else model, leaf, swapped)
    redraw(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(is_adapter(k) for k in missing):
        raise ValueError(f"add_adapters: the base does not fit ({unexpected[:2] or missing[:2]})")
    if adapters is not None:
        if sorted(adapters) != sorted(missing):
            wrong = sorted(set(adapters) ^ set(missing))
            raise ValueError(f"the adapters do not fit this model's lora_targets ({wrong[:3]}...)")
        model.load_state_dict(adapters, strict=False)
    model.lora = cfg
    freeze_base(model)
    return model


def redraw(model: GPT) -> None:
    """Draw, in order, the random numbers that building the adapted model from scratch draws:
    each module's own reset as it is made, then GPT's initialisation (the base's weights are put
    back afterwards). So a new adapter's A is a function of the run's seed, the same one that
    adapters built inside the model had before lora.py existed."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.reset_parameters()
            if isinstance(m, LoRALinear):
                m.reset_adapters()

    def init(module: nn.Module) -> None:
        GPT.init_module(module)
        if isinstance(module, LoRALinear):
            module.reset_adapters()
    model.init_weights(init)


def adapter_state(model: GPT) -> dict:
    """The tensors a LoRA run trains and saves (the base is frozen and referenced)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def freeze_base(model: GPT) -> tuple[int, int]:
    """Only adapters train; returns (trainable, total) parameter counts."""
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter(name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), model.num_params(False)


@torch.no_grad()
def merge(model: GPT) -> GPT:
    """A plain GPT computing what the adapted model does, adapters folded into the weights. An
    adapted head on a tied embedding unties them (the embedding keeps its rows)."""
    cfg = model.config
    head_adapted = isinstance(model.lm_head, LoRALinear) and bool(model.lm_head.parts)
    plain = dataclasses.replace(cfg, tie_embeddings=cfg.tie_embeddings and not head_adapted)
    state = {k: v.clone() for k, v in model.state_dict().items() if not is_adapter(k)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[name + ".weight"] = module.merged_weight()
    wte = model.transformer.wte
    if isinstance(wte, LoRAEmbedding):
        state["transformer.wte.weight"][wte.new_from:] += wte.lora_rows
        head = model.lm_head
        state["lm_head.weight"][head.new_from:] += head.lora_rows
    if plain.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    merged = GPT(plain)
    merged.load_state_dict(state)
    return merged.to(model.lm_head.weight.device)


@contextmanager
def adapters_off(model: GPT):
    """model as the base its adapters were added to: each LoRALinear / LoRAEmbedding runs its plain
    layer's forward, skipping the low-rank updates and the new tokens' rows (both start at zero,
    so this is the model a LoRA run started from): DPO's reference without a second copy, as
    peft's disable_adapter() is."""
    swapped = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]
    for m in swapped:
        m.forward = super(type(m), m).forward  # nn.Linear's / nn.Embedding's, on the same weight
    try:
        yield model
    finally:
        for m in swapped:
            del m.forward
