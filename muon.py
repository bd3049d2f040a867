"""
Muon for the transformer's hidden matrices, AdamW for everything else (optimizer = "muon").

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces each 2-D update
by the nearest semi-orthogonal matrix (momentum -> Newton-Schulz), so every direction of the
matrix moves at the same rate. It is meant for hidden layers only: embeddings, the output head,
gains and biases stay with AdamW (Muon is Scalable for LLM Training, Liu et al. 2025).

We use the library's torch.optim.Muon. Its Newton-Schulz iteration is hard-coded in bfloat16,
which is fast on GPUs but far slower than float32 on CPUs without bfloat16 matmul instructions
(~15x per step on an AVX2-only machine), so install_float32_newtonschulz() swaps in an
iteration that runs in float32 when the gradient is on the CPU and calls the library's own
bfloat16 iteration everywhere else.
"""
import inspect

import torch
import torch.optim._muon as _muon_module

_ORIGINAL_NS = getattr(_muon_module, "_zeropower_via_newtonschulz", None)
_EXPECTED_ARGS = ["grad", "ns_coefficients", "ns_steps", "eps"]


def newtonschulz_float32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float],
                         ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, computed in float32."""
    a, b, c = ns_coefficients
    X = grad.float()
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
        X = X.T
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm, so ||X||_2 <= 1
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


def _zeropower(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """float32 on the CPU; the library's bfloat16 iteration on every other device."""
    if grad.device.type == "cpu":
        if ns_steps >= 100 or grad.ndim != 2 or len(ns_coefficients) != 3:
            return _ORIGINAL_NS(grad, ns_coefficients, ns_steps, eps)  # it raises the errors
        return newtonschulz_float32(grad, ns_coefficients, ns_steps, eps)
    return _ORIGINAL_NS(grad, ns_coefficients, ns_steps, eps)


def install_float32_newtonschulz() -> None:
    """Point torch.optim.Muon at _zeropower (idempotent). torch.optim._muon looks the function
    up by its module-level name at every step, so replacing that name is enough."""
    if _ORIGINAL_NS is None or list(inspect.signature(_ORIGINAL_NS).parameters) != _EXPECTED_ARGS:
        raise RuntimeError(
            f"torch {torch.__version__}: torch.optim._muon._zeropower_via_newtonschulz(grad, "
            "ns_coefficients, ns_steps, eps) is missing or has changed, so danlu cannot give "
            "Muon its float32 CPU path. Use optimizer = 'adamw', or a torch version whose "
            "torch.optim.Muon matches (2.9 - 2.13 do).")
    _muon_module._zeropower_via_newtonschulz = _zeropower


def split_params(model: torch.nn.Module) -> tuple[list, list, list]:
    """(block matrices for Muon, other matrices for AdamW with decay, 1-D tensors without).
    Block matrices are the 2-D weights of attention and MLP inside transformer.h; the token and
    position embeddings and lm_head are outside the blocks, so they go to AdamW."""
    block_ids = {id(p) for p in model.transformer.h.parameters()}
    muon, adam_decay, adam_no_decay = [], [], []
    for p in model.parameters():  # a tied matrix is listed once
        if not p.requires_grad:
            continue
        if p.dim() == 2 and id(p) in block_ids:
            muon.append(p)
        elif p.dim() >= 2:
            adam_decay.append(p)
        else:
            adam_no_decay.append(p)
    return muon, adam_decay, adam_no_decay


def make_muon_optimizers(model: torch.nn.Module, cfg, device_type: str) -> list[torch.optim.Optimizer]:
    """[Muon over the block matrices, AdamW over the rest]; train.py steps and checkpoints both.

    adjust_lr_fn="original" (Keller Jordan's sqrt(max(1, rows / cols)) scaling) keeps muon_lr in
    Muon's own units: 0.02 is the rate tuned for it in the Muon post and modded-nanogpt, and it
    stays independent of learning_rate. "match_rms_adamw" (0.2 sqrt(max(rows, cols))) would make
    muon_lr an AdamW-sized rate instead; we keep the two rates separate so each can be tuned."""
    install_float32_newtonschulz()
    muon_params, adam_decay, adam_no_decay = split_params(model)
    # torch.optim.Muon's decay is decoupled and scaled by lr: p *= 1 - muon_lr * weight_decay
    muon = torch.optim.Muon(muon_params, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                            weight_decay=cfg.weight_decay, nesterov=True, adjust_lr_fn="original")
    groups = [{"params": adam_decay, "weight_decay": cfg.weight_decay},
              {"params": adam_no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              fused=device_type == "cuda")
    return [muon, adamw]
