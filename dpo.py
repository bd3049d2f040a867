"""
DPO (Direct Preference Optimization, Rafailov et al. 2023): a chat model (an SFT run) + preference
pairs from prepare/dpo.py -> a model that prefers the chosen replies, trained by train.py's loop.

    python prepare/dpo.py --input prefs.json --name dpo_zh --base data/<pretrain-dataset>
    python dpo.py config/dpo_zh.py [--base=weight/<sft run>] [--key=value ...]
    python dpo.py config/dpo_zh.py --lora_rank=8     # adapters; the reference is the base with them off

The loss of a pair, TRL's "sigmoid" DPO loss (with label_smoothing ε: conservative DPO):
    z = beta * ((log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected)))
    loss = -(1 - ε) log σ(z) - ε log σ(-z)
log π(reply) sums the log-probabilities of the reply's tokens and its end-of-turn (the masked
targets; the prompt is context). The reference π_ref is the starting model, run without gradient
or dropout: a frozen copy for full fine-tuning, the same model with its adapters turned off for
LoRA (no second copy). Losses are summed over pairs and the loop divides by the step's pairs, so
batch 8 x 1 equals 4 x 2 equals 2 processes x 4 (DDP or FSDP). Each evaluation logs, on train and
val pairs, TRL's figures: rewards/chosen (beta * (log π - log π_ref), mean over chosen replies),
rewards/rejected, rewards/margins, rewards/accuracies (the share of pairs whose chosen reward is
the higher; 0 at iter 0, where every pair ties), logps/chosen, logps/rejected; and
logps/accuracies, how often the model itself finds the chosen reply likelier (iter 0: the SFT
model's). Resume, LoRA and the keys are sft.py's: its pieces build the model.
"""
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from checkpoint import base_model
from data import DataError, Examples, dataset_dir
from lora import adapters_off
from model import GPT
from runtime import all_reduce_sum, print0, setup_runtime
from settings import ConfigError, cli, load_config, setting
from sft import SFTConfig, fine_tune_setup, sample_replies, start_model
from tokenizer import from_meta, load_meta
from train import done_line, train


@dataclass
class DPOConfig(SFTConfig):
    # Fields re-declared here change the default; the valid values stay those of SFTConfig.
    base: str = ""  # the chat model to start from (and the reference): weight/<sft run>, ...
    dataset: str = ""  # preference pairs, data/<name> from prepare/dpo.py
    beta: float = setting(0.1, above=0.0)  # the rewards' scale: larger keeps the model nearer the reference
    label_smoothing: float = setting(0.0, lo=0.0, below=0.5)  # conservative DPO: the share of labels taken as flipped
    batch_size: int = 4  # pairs per micro-batch: 2 x batch_size sequences
    learning_rate: float = 1e-6  # TRL's and the paper's
    min_lr: float = 1e-7


# ----------------------------------------------------------------------------- the pairs

class Pairs(Examples):
    """The pairs of a prepare/dpo.py dataset: examples 2i (prompt + chosen reply) and 2i + 1
    (prompt + rejected reply). Shuffling, epochs, ranks and resume are Examples', counted in
    pairs, so a pair is never split; a batch of B pairs is x, y (2B, T): the B chosen rows,
    then the B rejected rows in the same order."""

    def __init__(self, data_dir: str, split: str, *args, **kwargs):
        super().__init__(data_dir, split, *args, **kwargs)
        if len(self.starts) % 2:
            raise DataError(f"{self.bin_path} holds {len(self.starts)} examples, not whole pairs; "
                            "prepare it with python prepare/dpo.py")

    def __len__(self) -> int:
        return len(self.starts) // 2

    def lengths(self) -> np.ndarray:
        n = (self.ends - self.starts)[:2 * len(self)]
        return np.maximum(n[0::2], n[1::2])  # a pair pads to its longer half

    def collate(self, indices, device="cpu"):
        pairs = np.asarray(indices, dtype=np.int64)
        return super().collate(np.concatenate([2 * pairs, 2 * pairs + 1]), device)


def pair_loaders(cfg: DPOConfig, data_dir: str, meta: dict, run, vocab_size: int) -> dict:
    """train.make_loaders' layout for pairs: a shuffled train stream, fixed evaluation batches."""
    accum = max(1, cfg.gradient_accumulation_steps // run.world_size)

    def make(split, shuffle):
        return Pairs(data_dir, split, cfg.block_size, cfg.batch_size, vocab_size, cfg.seed, run.rank, run.world_size,
                     shuffle, whole_only=True, accum=accum, group_by_length=cfg.group_by_length)
    return {"train": make("train", True), "eval": {s: make(s, False) for s in ("train", "val")}}


# ----------------------------------------------------------------------------- the objective

def reply_logps(model: GPT, x: Tensor, y: Tensor) -> Tensor:
    """(R,): each row's summed log-probability of its targets (y != -1) given x (R, T). The head
    runs only at target positions, as train.Objective's loss_only does."""
    h = model.body(x)  # (R, T, C)
    flat = y.reshape(-1)
    pos = (flat != -1).nonzero().squeeze(1)  # (N,)
    logits = model.head(h.reshape(-1, h.size(-1))[pos]).float()  # (N, V)
    logp = -F.cross_entropy(logits, flat[pos], reduction="none")  # (N,)
    return torch.zeros(x.size(0), device=x.device).index_add(0, pos // x.size(1), logp)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, chosen reward, rejected reward), each (B,), from the four (B,) log-probabilities;
    the rewards carry no gradient. Computed in TRL's order (tests/test_dpo.py compares them);
    label smoothing as TRL's sigmoid loss had it before 1.0 (cDPO, Mitchell 2023)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    z = beta * (chosen_logratios - rejected_logratios)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class DPO(nn.Module):
    """The DPO objective for train.py's loop: forward(x, y) -> (the loss summed over the batch's
    pairs, None); count -> the pairs. The reference is a frozen model, or None: the policy with
    its adapters off. Evaluation batches also add up TRL's rewards (metrics)."""

    def __init__(self, model: GPT, reference: GPT | None, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.beta, self.label_smoothing = model, beta, label_smoothing
        self.__dict__["reference"] = reference  # not a submodule: outside DDP, compile and .parameters()
        self.sums = None  # evaluation: the sums metrics() reports, and the pairs

    @torch.no_grad()
    def reference_logps(self, x: Tensor, y: Tensor) -> Tensor:
        """(2B,): reply_logps under the reference."""
        if self.reference is not None:
            return reply_logps(self.reference, x, y)
        was_training = self.model.training
        self.model.eval()  # no dropout: the reference is a fixed function
        try:
            with adapters_off(self.model):
                return reply_logps(self.model, x, y)
        finally:
            self.model.train(was_training)

    def forward(self, x: Tensor, y: Tensor, w: Tensor | None = None) -> tuple[Tensor, None]:
        """x, y (2B, T): B chosen rows, then their B rejected rows."""
        ref = self.reference_logps(x, y).chunk(2)  # ((B,), (B,))
        policy = reply_logps(self.model, x, y).chunk(2)
        loss, chosen, rejected = dpo_loss(*policy, *ref, self.beta, self.label_smoothing)
        if not self.model.training:  # estimate_loss: the figures of the whole evaluation
            logp_chosen, logp_rejected = (p.detach() for p in policy)
            sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), logp_chosen.sum(),
                                logp_rejected.sum(), (logp_chosen > logp_rejected).float().sum(),
                                chosen.new_tensor(float(len(chosen)))])
            self.sums = sums if self.sums is None else self.sums + sums
        return loss.sum(), None

    def count(self, y: Tensor, w: Tensor | None = None) -> Tensor:
        return torch.tensor(y.size(0) // 2, device=y.device)

    def metrics(self, run) -> dict:
        """Means over every pair this objective evaluated, on all ranks: TRL's rewards and logps,
        and logps/accuracies (not TRL's), the share of pairs whose chosen reply the model itself
        finds likelier; it needs no reference, so the first evaluation says where the model starts.
        The sums restart: under FSDP one objective evaluates every split, every time."""
        chosen, rejected, wins, logp_chosen, logp_rejected, likelier, pairs = all_reduce_sum(self.sums, run).tolist()
        self.sums = None
        return {"rewards/chosen": chosen / pairs, "rewards/rejected": rejected / pairs,
                "rewards/margins": (chosen - rejected) / pairs, "rewards/accuracies": wins / pairs,
                "logps/chosen": logp_chosen / pairs, "logps/rejected": logp_rejected / pairs,
                "logps/accuracies": likelier / pairs}


def frozen(model: GPT) -> GPT:
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- entry point

def main(argv=None) -> dict:
    cfg = load_config(DPOConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.base or not cfg.dataset:
        raise ConfigError("dpo.py needs base (the chat model to start from, weight/<sft run>) and "
                          "dataset (preference pairs from prepare/dpo.py)")
    if cfg.prompt_loss_weight or cfg.cls_head == "mlp":
        raise ConfigError("DPO scores whole replies of a language model: prompt_loss_weight and "
                          "cls_head = 'mlp' do not apply; remove them")
    run = setup_runtime(cfg.device, cfg.dtype, cfg.threads, cfg.dist_timeout)
    data_dir = dataset_dir(cfg.dataset)
    meta = load_meta(data_dir)
    if meta.get("task") != "dpo":
        raise ConfigError(f"{data_dir} holds no preference pairs; make them with python prepare/dpo.py "
                          "--input FILE --name NAME --base data/<pretrain>", "dataset")
    pretrained, new_ids, model_cfg, loaders, per_iter = fine_tune_setup(cfg, run, data_dir, meta, pair_loaders)

    model, state, lora_base = start_model(cfg, run, model_cfg, pretrained, new_ids)
    # The reference is the starting model also when resuming: the base's weights, not the run's.
    reference = None if cfg.lora_rank else frozen(base_model(pretrained, model_cfg, new_ids)).to(run.device)
    del pretrained
    model.to(run.device)
    print0(f"DPO: {len(loaders['train'])} train pairs, {per_iter} per iter, {cfg.max_iters} iters, beta {cfg.beta}, "
           f"reference: {'the base, adapters off' if reference is None else 'a frozen copy of ' + cfg.base}")
    prompts = [p.strip() for p in cfg.sample_prompts.split("|") if p.strip()]
    summary = train(cfg, run, model, loaders, meta, state, sample_replies(prompts, from_meta(meta), cfg, run),
                    lora_base, make_objective=lambda m, _: DPO(m, reference, cfg.beta, cfg.label_smoothing))
    print0(f"{done_line(summary, cfg.out_dir)}\nchat with: python sample.py --out_dir={cfg.out_dir} --chat")
    return summary


if __name__ == "__main__":
    cli(main)
