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


def make_muon(params: list, cfg) -> torch.optim.Optimizer:
    """torch.optim.Muon over the block matrices (train.param_groups decides which they are);
    train.py steps and checkpoints it beside the AdamW that takes the rest.

    adjust_lr_fn="original" (Keller Jordan's sqrt(max(1, rows / cols)) scaling) keeps muon_lr in
    Muon's own units: 0.02 is the rate tuned for it in the Muon post and modded-nanogpt, and it
    stays independent of learning_rate. "match_rms_adamw" (0.2 sqrt(max(rows, cols))) would make
    muon_lr an AdamW-sized rate instead; we keep the two rates separate so each can be tuned."""
    install_float32_newtonschulz()
    # torch.optim.Muon's decay is decoupled and scaled by lr: p *= 1 - muon_lr * weight_decay
    return torch.optim.Muon(params, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                            weight_decay=cfg.weight_decay, nesterov=True, adjust_lr_fn="original")
