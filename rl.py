"""
RL with a checkable reward: a chat model (an SFT run) + questions with reference answers -> a
model that answers them right more often, trained by train.py's loop.

    python rl.py config/rl_arith.py [--base=weight/<sft run>] [--key=value ...]
    python rl.py config/rl_arith.py --lora_rank=8    # adapters; the KL reference is the base with them off

Each micro-batch takes batch_size questions (a JSONL of {"prompt", "reference"}, `prompts`) and
samples group_size replies to each from the current model (engine.BatchDecoder: one forward a
step for every reply, each reply with its own seeded generator). `reward` scores each reply:
"exact" (1 when it equals the reference, stripped), "number" (1 when its last number is the
reference's), or "module:function", a callable (prompt, reply, reference) -> float of the
user's. The advantage of a reply is its reward minus its group's mean (GRPO, Shao et al. 2024,
without the division by the group's spread, as Dr. GRPO argues); a group whose replies all
score the same teaches nothing and is left out. The loss, per reply token (the end-of-turn
included):
    -A * log π(token) + kl_coef * (π_ref/π - log(π_ref/π) - 1)
the policy gradient of one on-policy step (no ratio to clip: each batch is sampled by the weights
it updates), plus the k3 estimate of KL(π || π_ref) (Schulman 2020) to the starting model: a
frozen copy, or for LoRA the same model with its adapters off. The loop divides by the step's
reply tokens, so batch 8 x 1 equals 4 x 2. Sampling draws from generators seeded by (seed,
question draw, reply), and the question order is a function of (seed, epoch), so a run resumed
in a new process samples what an uninterrupted one would.

Evaluation: the loss of the reference answers of `dataset` (the SFT data: val_loss, best.pt),
and, per file of `val_prompts`, greedy exact match (pass@1, also per "group" of the file:
en, zh) and pass@k (any of k sampled replies right); the rollouts since the last evaluation:
mean reward, pass@1 (share of sampled replies right), pass@k, reply length, KL. One process.
"""
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from checkpoint import base_model
from data import DataError, dataset_dir
from engine import sample_groups, seeded, turn_text, user_prompt
from lora import adapters_off
from model import GPT
from rewards import load_reward, read_questions
from runtime import print0, setup_runtime
from settings import ConfigError, cli, load_config, setting
from sft import SFTConfig, fine_tune_setup, start_model
from tokenizer import from_meta, load_meta
from train import done_line, make_loaders, train


@dataclass
class RLConfig(SFTConfig):
    # Fields re-declared here change the default; the valid values stay those of SFTConfig.
    base: str = ""  # the chat model to start from (and the KL reference): weight/<sft run>
    dataset: str = ""  # the SFT data of the base (data/<name>): its tokenizer, and the val loss of its answers
    prompts: str = ""  # JSONL of {"prompt", "reference"}: the questions RL trains on
    val_prompts: str = ""  # "|"-separated JSONL files of the same kind, scored at each evaluation
    reward: str = "exact"  # exact | number | module:function (prompt, reply, reference) -> float
    group_size: int = setting(8, lo=2)  # replies sampled per question
    batch_size: int = 8  # questions per micro-batch: batch_size x group_size replies
    temperature: float = setting(1.0, above=0.0)
    top_k: int = setting(0, lo=0)  # 0: all tokens
    max_new_tokens: int = setting(64, lo=1)  # per reply
    kl_coef: float = setting(0.0, lo=0.0)  # weight of the KL to the starting model
    val_max: int = setting(200, lo=1)  # questions scored per val_prompts file
    pass_k: int = setting(8, lo=0)  # val: pass@k from k sampled replies per question; 0: greedy pass@1 only
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 0
    dropout: float = 0.0


# ----------------------------------------------------------------------------- rollouts

class Rollouts:
    """The train "loader" of RL: get_batch() samples group_size replies to each of the next
    batch_size questions from the model and returns x, y, w (R, T): y the reply tokens (-1
    elsewhere), w each reply's advantage on them. Questions come in a seeded shuffle per epoch;
    an epoch ends only between optimizer steps, as data.Examples does. state_dict is the
    position; `stats` add up what extra_eval logs."""

    def __init__(self, questions: list[dict], tok, cfg: RLConfig, reward_fn, accum: int):
        self.questions, self.tok, self.cfg, self.reward_fn, self.accum = questions, tok, cfg, reward_fn, accum
        self.prompts = [user_prompt(tok, q["prompt"]) for q in questions]
        self.model, self.autocast = None, None  # set once built: the policy the replies are sampled from
        self.epoch, self.pos = 0, 0
        self.order = self._order()
        self.stats = np.zeros(5)  # replies, reward sum, right replies, groups, groups with one right

    def __len__(self) -> int:
        return len(self.questions)

    def _order(self) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.cfg.seed, self.epoch])).permutation(len(self))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = self._order()

    def next_questions(self) -> list[tuple[int, int]]:
        """(question index, draw number) of the next micro-batch."""
        B = self.cfg.batch_size
        step = B * self.accum
        if (self.pos // B) % self.accum == 0 and self.pos + step > len(self):
            if step > len(self):
                raise DataError(f"{self.cfg.prompts} holds {len(self)} questions, fewer than one optimizer step "
                                f"takes ({step}); lower batch_size or gradient_accumulation_steps")
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self._order()
        draw = self.epoch * len(self) + self.pos  # which draw of the run this is: seeds its replies
        batch = self.order[self.pos:self.pos + B]
        self.pos += B
        return [(int(i), draw + k) for k, i in enumerate(batch)]

    def get_batch(self, device="cpu"):
        cfg, n = self.cfg, self.cfg.group_size
        picked = self.next_questions()
        prompts = [self.prompts[i] for i, _ in picked]
        generators = [seeded(cfg.seed, 0, d, j) for _, d in picked for j in range(n)]
        replies = sample_groups(self.model, self.tok, prompts, n, cfg.temperature, cfg.top_k, cfg.max_new_tokens,
                                generators, self.autocast)
        rows = []
        for k, (i, _) in enumerate(picked):
            q, group = self.questions[i], replies[k * n:(k + 1) * n]
            rewards = np.array([float(self.reward_fn(q["prompt"], turn_text(self.tok, r), q["reference"]))
                                for r in group])
            right = rewards >= 1.0
            self.stats += [n, rewards.sum(), right.sum(), 1, right.any()]
            if np.ptp(rewards) == 0:
                continue  # no reply better than another: no signal
            rows += [(prompts[k], r, a) for r, a in zip(group, rewards - rewards.mean())]
        return collate(rows, device)


def collate(rows: list[tuple[list[int], list[int], float]], device) -> tuple[Tensor, Tensor, Tensor]:
    """x, y, w (R, T) for (prompt, reply, advantage) rows, right-padded: y the reply's tokens,
    w the advantage on them. No rows: one row without targets (the loop skips such a step)."""
    if not rows:
        return (torch.zeros(1, 1, dtype=torch.long, device=device), torch.full((1, 1), -1, device=device),
                torch.zeros(1, 1, device=device))
    T = max(len(p) + len(r) for p, r, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    w = torch.zeros(len(rows), T)
    for b, (prompt, reply, advantage) in enumerate(rows):
        seq = torch.tensor(prompt + reply)
        x[b, :len(seq) - 1] = seq[:-1]
        y[b, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]
        w[b, len(prompt) - 1:len(seq) - 1] = advantage
    return x.to(device), y.to(device), w.to(device)


# ----------------------------------------------------------------------------- the objective

def token_logps(model: GPT, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(positions (N,) into the flattened (R*T) batch where y is a target, their log-probabilities (N,));
    the head runs only there, as train.Objective's loss_only does."""
    h = model.body(x)  # (R, T, C)
    flat = y.reshape(-1)
    pos = (flat != -1).nonzero().squeeze(1)  # (N,)
    logits = model.head(h.reshape(-1, h.size(-1))[pos]).float()  # (N, V)
    return pos, -F.cross_entropy(logits, flat[pos], reduction="none")


class PolicyGradient(nn.Module):
    """The RL objective for train.py's loop. Rollout batches (w: advantages) give the policy
    gradient loss plus kl_coef x KL, summed over reply tokens; count -> the reply tokens.
    Evaluation batches of the SFT data (w None) give the reference answers' cross-entropy, so
    val_loss is the loss on right answers. The reference is a frozen model, or None: the policy
    with its adapters off."""

    def __init__(self, model: GPT, reference: GPT | None, kl_coef: float):
        super().__init__()
        self.model, self.kl_coef = model, kl_coef
        self.__dict__["reference"] = reference  # not a submodule: outside compile and .parameters()
        self.kl = torch.zeros(2)  # KL summed over reply tokens, tokens; read and reset by extra_eval

    @torch.no_grad()
    def reference_logps(self, x: Tensor, y: Tensor) -> Tensor:
        if self.reference is not None:
            return token_logps(self.reference, x, y)[1]
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_off(self.model):
                return token_logps(self.model, x, y)[1]
        finally:
            self.model.train(was_training)

    def forward(self, x: Tensor, y: Tensor, w: Tensor | None = None) -> tuple[Tensor, None]:
        pos, logp = token_logps(self.model, x, y)
        if w is None:
            return -logp.sum(), None
        advantage = w.reshape(-1)[pos]
        log_ratio = self.reference_logps(x, y) - logp  # log π_ref/π of each sampled token
        kl = log_ratio.exp() - log_ratio - 1  # k3: unbiased for KL(π || π_ref), never negative
        self.kl += torch.stack([kl.detach().sum().cpu(), torch.tensor(float(len(pos)))])
        return (-advantage * logp + self.kl_coef * kl).sum(), None

    def count(self, y: Tensor, w: Tensor | None = None) -> Tensor:
        return (y != -1).sum()


# ----------------------------------------------------------------------------- evaluation

def pass_rates(model: GPT, tok, questions: list[dict], reward_fn, cfg: RLConfig, autocast=None) -> dict:
    """Greedy pass@1 (the reward's share of right replies: with "exact", eval.py's exact match;
    overall and per group) and pass@k (any of k sampled replies right, drawn the same way at every
    evaluation) of the questions, in percent; the greedy replies' mean length in tokens."""
    prompts = [user_prompt(tok, q["prompt"]) for q in questions]
    right = lambda q, r: float(reward_fn(q["prompt"], turn_text(tok, r), q["reference"])) >= 1.0  # noqa: E731
    greedy = sample_groups(model, tok, prompts, 1, 0.0, 0, cfg.max_new_tokens, autocast=autocast)
    ok = np.array([right(q, r) for q, r in zip(questions, greedy)])
    out = {"pass@1": 100 * ok.mean(), "reply_tokens": float(np.mean([len(r) for r in greedy]))}
    n = cfg.pass_k
    if n:
        sampled = sample_groups(model, tok, prompts, n, cfg.temperature, cfg.top_k, cfg.max_new_tokens,
                                [seeded(cfg.seed, 1, i, j) for i in range(len(prompts)) for j in range(n)], autocast)
        any_ok = [any(right(q, r) for r in sampled[i * n:(i + 1) * n]) for i, q in enumerate(questions)]
        out[f"pass@{n}"] = 100 * float(np.mean(any_ok))
    for group in sorted({q["group"] for q in questions} - {""}):
        mine = np.array([q["group"] == group for q in questions])
        out[f"pass@1_{group}"] = 100 * ok[mine].mean()
    return out


def rl_eval(rollouts: Rollouts, objective: "PolicyGradient", val_sets: dict, reward_fn, cfg: RLConfig):
    """extra_eval for train(): the rollouts since the last evaluation and each val file's pass rates."""

    @torch.no_grad()
    def extra_eval(model: GPT) -> dict:
        out = {}
        replies, reward, right, groups, groups_right = rollouts.stats
        kl_sum, tokens = objective.kl.tolist()
        if replies:
            out.update({"rollout_reward": reward / replies, "rollout_pass@1": 100 * right / replies,
                        f"rollout_pass@{cfg.group_size}": 100 * groups_right / groups,
                        "rollout_kl": kl_sum / max(tokens, 1)})
        rollouts.stats[:] = 0
        objective.kl.zero_()
        for name, questions in val_sets.items():
            rates = pass_rates(model, rollouts.tok, questions, reward_fn, cfg, rollouts.autocast)
            out.update({f"{name}_{k}": v for k, v in rates.items()})
            shown = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
            print0(f"  {name}: {shown}")
        return out
    return extra_eval


# ----------------------------------------------------------------------------- entry point

def main(argv=None) -> dict:
    cfg = load_config(RLConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.base or not cfg.dataset or not cfg.prompts:
        raise ConfigError("rl.py needs base (the chat model to start from, weight/<sft run>), dataset (its SFT "
                          "data, data/<name>) and prompts (a JSONL of {\"prompt\", \"reference\"} questions)")
    if cfg.prompt_loss_weight or cfg.cls_head == "mlp":
        raise ConfigError("RL scores replies of a language model: prompt_loss_weight and cls_head = 'mlp' do not "
                          "apply; remove them")
    reward_fn = load_reward(cfg.reward)
    questions = read_questions(cfg.prompts, "prompts")
    val_sets = {}
    for path in (p.strip() for p in cfg.val_prompts.split("|") if p.strip()):
        name = path.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".jsonl")
        val_sets[name] = read_questions(path, "val_prompts")[:cfg.val_max]
    run = setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    if run.ddp:
        raise ConfigError("rl.py samples on one process; run it with python, not torchrun")
    data_dir = dataset_dir(cfg.dataset)
    meta = load_meta(data_dir)
    accum = cfg.gradient_accumulation_steps
    holder = {}

    def loaders_for(cfg, data_dir, meta, run, vocab_size):
        loaders = make_loaders(cfg, data_dir, meta, run, vocab_size)  # its evaluation batches: the SFT answers
        holder["rollouts"] = Rollouts(questions, from_meta(meta), cfg, reward_fn, accum)
        return {"train": holder["rollouts"], "eval": loaders["eval"]}

    pretrained, new_ids, model_cfg, loaders, per_iter = fine_tune_setup(cfg, run, data_dir, meta, loaders_for)
    if new_ids:
        raise ConfigError(f"{cfg.base} lacks chat tokens {data_dir} has: RL starts from a chat model "
                          "(an SFT run of this dataset)", "base")
    model, state, lora_base = start_model(cfg, run, model_cfg, pretrained, new_ids)
    # The KL reference is the starting model also when resuming: the base's weights, not the run's.
    reference = None if cfg.lora_rank else base_model(pretrained, model_cfg, new_ids).eval().requires_grad_(False)
    del pretrained
    model.to(run.device)
    if reference is not None:
        reference.to(run.device)
    rollouts = holder["rollouts"]
    rollouts.model, rollouts.autocast = model, run.autocast
    # One objective for the steps and the evaluations (its KL sums are what extra_eval reports)
    objective = PolicyGradient(model, reference, cfg.kl_coef)
    print0(f"RL: {len(questions)} questions, {per_iter} per iter x {cfg.group_size} replies, {cfg.max_iters} iters, "
           f"reward {cfg.reward}, kl_coef {cfg.kl_coef}, reference: "
           f"{'the base, adapters off' if reference is None else 'a frozen copy of ' + cfg.base}")
    extra = rl_eval(rollouts, objective, val_sets, reward_fn, cfg)
    summary = train(cfg, run, model, loaders, meta, state, extra, lora_base,
                    make_objective=lambda m, loader: objective)
    print0(f"{done_line(summary, cfg.out_dir)}\nchat with: python sample.py --out_dir={cfg.out_dir} --chat")
    return summary


if __name__ == "__main__":
    cli(main)
