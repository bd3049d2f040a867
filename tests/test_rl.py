"""rl.py: rollouts are reply tokens weighted by their group-relative advantage, groups without
signal are left out, sampling is seeded per question and reply; the loss is the policy gradient
(+ KL, zero while policy == reference); 8 x 1 == 4 x 2; resume in a new process is exact; LoRA's
KL reference is the model with adapters off; a bad reward says which key to fix; a short run
raises the reward it is given."""
import copy
import os

import numpy as np
import pytest
import torch

import engine
import rewards
import rl
import train
from checkpoint import load_checkpoint
from conftest import ROOT, read_log, run_script, step_losses
from lora import LoRAConfig, add_adapters
from prepare import arith
from settings import ConfigError
from tokenizer import END_OF_TURN, from_meta, load_meta

REWARD = "def short(prompt, reply, reference):\n    return float(len(reply) <= 12)\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """data/arith (300 chats, 64 RL questions) and weight/arith (a 1 x 32 chat model, 40 steps:
    replies of every length, so a reward for short replies has something to teach)."""
    folder = tmp_path_factory.mktemp("rl")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        arith.main(["--n_train=300", "--n_val=16", "--n_rl=64"])
        train.main([os.path.join(ROOT, "config", "arith.py"), "--max_iters=40", "--eval_interval=40", "--eval_iters=1",
                    "--n_layer=1", "--n_embd=32", "--device=cpu", "--optimizer=adamw", "--learning_rate=1e-2",
                    "--min_lr=1e-3"])
        with open("myreward.py", "w") as f:
            f.write(REWARD)
        yield folder


ARGS = ["--base=weight/arith", "--dataset=arith", "--prompts=data/arith/rl_train.jsonl", "--reward=myreward:short",
        "--device=cpu", "--batch_size=4", "--group_size=4", "--learning_rate=3e-3", "--eval_iters=1",
        "--log_interval=1", "--val_prompts=data/arith/val_operands.jsonl", "--val_max=8", "--pass_k=2"]


def policy(lora: bool = False):
    ckpt = load_checkpoint("weight/arith")
    model = train.GPT(train.gpt_config(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    if lora:
        model = add_adapters(model, LoRAConfig(lora_rank=4, lora_targets="q,k,v,o,mlp_in,mlp_out,head"))
    return model, from_meta(ckpt["tokenizer"])


def test_collate_targets_reply_tokens_weighted_by_advantage(work):
    x, y, w = rl.collate([([1, 2, 3], [7, 8, 9], 0.5), ([4, 5], [6], -0.25)], "cpu")
    assert x.tolist() == [[1, 2, 3, 7, 8], [4, 5, 0, 0, 0]]
    assert y.tolist() == [[-1, -1, 7, 8, 9], [-1, 6, -1, -1, -1]]  # the reply (its end token too), nothing else
    assert w.tolist() == [[0, 0, 0.5, 0.5, 0.5], [0, -0.25, 0, 0, 0]]
    x, y, w = rl.collate([], "cpu")  # no signal in the step: no targets, the loop skips it
    assert (y == -1).all() and rl.PolicyGradient(policy()[0], None, 0.0).count(y, w) == 0


def test_rollouts_are_seeded_and_groups_without_signal_are_left_out(work):
    model, tok = policy()
    cfg = rl.RLConfig(base="weight/arith", dataset="arith", prompts="data/arith/rl_train.jsonl", batch_size=4,
                      group_size=4, max_new_tokens=48)
    questions = rewards.read_questions(cfg.prompts, "prompts")
    given = []

    def reward(prompt, reply, reference):
        given.append(rewards.BUILTIN_REWARDS["exact"](prompt, reply, reference) + len(reply) % 3)
        return given[-1]
    batches = []
    for _ in range(2):
        loader = rl.Rollouts(questions, tok, cfg, reward, accum=1)
        loader.model = model
        batches.append(loader.get_batch())
    assert all(torch.equal(a, b) for a, b in zip(*batches))  # same seed, same question draw: same replies
    x, y, w = batches[0]
    end = tok.token_id(END_OF_TURN)
    group_rewards = np.array(given[:16]).reshape(4, 4)
    kept = [g for g in group_rewards if np.ptp(g) > 0]
    assert x.size(0) == 4 * len(kept) and loader.stats[0] == 16  # every reply counts in the stats
    row_adv = torch.tensor([float(r[y[i] != -1][0]) for i, r in enumerate(w)])
    assert torch.allclose(row_adv, torch.tensor(np.concatenate([g - g.mean() for g in kept]), dtype=torch.float32))
    for i in range(x.size(0)):
        targets = y[i][y[i] != -1]
        assert targets[-1] == end or len(targets) == cfg.max_new_tokens  # a reply ends with its end-of-turn
        assert (w[i][y[i] == -1] == 0).all()
    loader.get_batch()  # the next questions: positions advance by batch_size
    assert loader.state_dict() == {"epoch": 0, "pos": 8}


def test_loss_is_the_policy_gradient_and_kl_starts_at_zero(work):
    model, _ = policy()
    x, y, w = rl.collate([([5, 6, 7], [8, 9, 10], 0.75), ([5, 6], [11, 12], -0.75)], "cpu")
    objective = rl.PolicyGradient(model, copy.deepcopy(model).eval().requires_grad_(False), kl_coef=0.5)
    loss, _ = objective(x, y, w)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pos, logp = rl.token_logps(model, x, y)
    (-(w.reshape(-1)[pos] * logp).sum()).backward()  # the policy gradient: KL's gradient is 0 at policy == reference
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, model.parameters()))
    assert objective.kl.tolist() == [0.0, 5.0]  # summed k3, reply tokens
    assert objective.count(y, w) == 5
    with torch.no_grad():  # evaluation batches (w None): the cross-entropy of the targets
        assert torch.allclose(objective(x, y)[0], -logp.sum())


def test_lora_reference_is_the_model_with_adapters_off(work):
    model, _ = policy(lora=True)
    x, y, w = rl.collate([([5, 6, 7], [8, 9, 10], 1.0)], "cpu")
    objective = rl.PolicyGradient(model, None, kl_coef=0.1)
    with torch.no_grad():
        assert torch.equal(objective.reference_logps(x, y), rl.token_logps(model, x, y)[1])  # B = 0 at the start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        base, _ = policy()
        assert torch.equal(objective.reference_logps(x, y), rl.token_logps(base, x, y)[1])
        objective(x, y, w)
    assert objective.kl[0] > 0 and model.training
    rl.main(ARGS + ["--out_dir=weight/lora", "--lora_rank=4", "--max_iters=4", "--eval_interval=2"])
    evals = [r for r in read_log("weight/lora") if "val_loss" in r]
    assert evals[1]["rollout_kl"] >= 0 and "val_operands_pass@1" in evals[1] and "val_operands_pass@2" in evals[1]
    ckpt = load_checkpoint("weight/lora/ckpt.pt")
    assert ckpt["lora_base"]["path"] == "weight/arith" and all("lora_" in k for k in ckpt["model"])


def test_micro_batching_does_not_change_the_step(work):
    """batch 8 x 1 == 4 x 2: the same questions and replies, the loss summed over reply tokens
    and divided by the step's."""
    step = ARGS + ["--max_iters=3", "--eval_interval=100", "--val_prompts="]
    rl.main(step + ["--batch_size=8", "--gradient_accumulation_steps=1", "--out_dir=weight/a"])
    rl.main(step + ["--batch_size=4", "--gradient_accumulation_steps=2", "--out_dir=weight/b"])
    a, b = ([loss for _, loss in step_losses(f"weight/{n}")] for n in "ab")
    assert len(a) == 3 and np.allclose(a, b, rtol=1e-5, atol=1e-7), (a, b)
    wa, wb = (load_checkpoint(f"weight/{n}")["model"] for n in "ab")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)


def test_resume_in_a_new_process_is_exact(work):
    """4 iterations straight, or 2 and then 2 more in a new process (KL on): the same losses and
    weights; the resumed run samples the replies the uninterrupted one did."""
    common = ARGS + ["--lr_decay_iters=4", "--eval_interval=2", "--val_prompts=", "--kl_coef=0.1"]
    rl.main(common + ["--out_dir=weight/whole", "--max_iters=4"])
    rl.main(common + ["--out_dir=weight/parts", "--max_iters=2"])
    run_script("rl.py", *common, "--out_dir=weight/parts", "--max_iters=4")
    whole, parts = step_losses("weight/whole"), step_losses("weight/parts")
    assert [i for i, _ in parts] == [1, 2, 3, 4] and parts == whole
    a, b = (load_checkpoint(f"weight/{d}/ckpt.pt")["model"] for d in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_short_run_raises_the_reward(work):
    """The reward of the rollouts of iterations 1-2 against those of 11-12."""
    rl.main(ARGS + ["--out_dir=weight/short", "--max_iters=12", "--eval_interval=2", "--val_prompts="])
    evals = [r for r in read_log("weight/short") if "rollout_reward" in r]
    first, last = evals[0]["rollout_reward"], evals[-1]["rollout_reward"]
    assert first < 0.8 and last > 0.9 and last - first > 0.15, evals


def test_reward_errors_name_the_key(work):
    assert rewards.load_reward("exact")("q", " 1 + 2 = 3. ", "1 + 2 = 3.") == 1.0
    assert rewards.load_reward("number")("q", "so it is 42", "6 × 7 = 42.") == 1.0
    assert rewards.load_reward("myreward:short")("q", "short", "") == 1.0  # a module in the current folder
    for bad, says in (("nosuchmodule:f", "cannot be loaded"), ("myreward:nothere", "cannot be loaded"),
                      ("exactly", "neither"), ("os:sep", "not callable")):
        with pytest.raises(ConfigError, match=says) as e:
            rewards.load_reward(bad)
        assert "reward" in str(e.value) and "\n" not in str(e.value)
    with open("bad.jsonl", "w") as f:
        f.write('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        rewards.read_questions("bad.jsonl", "prompts")
    r = run_script("rl.py", *ARGS, "--out_dir=weight/x", "--reward=nosuchmodule:f", check=False)
    assert r.returncode != 0 and "reward" in r.stderr and "Traceback" not in r.stderr
    assert load_meta("data/arith")["task"] == "sft"


def test_pairs_are_the_models_own_wrong_replies_against_the_reference(work):
    """prepare/pairs.py: the reference is chosen, a reply the reward scored wrong rejected (the
    greedy one first), each question at most --per_question times; prepare/dpo.py reads the file
    and dpo.py (LoRA) trains on it; the output is never an input and is replaced only when asked."""
    import json
    from prepare import pairs
    model, tok = policy()
    reward = rewards.load_reward("myreward:short")
    questions = rewards.read_questions("data/arith/rl_train.jsonl", "prompts")[:16]
    records, counts = pairs.mine_pairs(model.eval(), tok, questions, reward, samples=3, temperature=1.0,
                                       per_question=2, max_new_tokens=48, seed=0)
    assert counts["pairs"] == len(records) > 0 and counts["greedy_wrong"] <= counts["any_wrong"] <= 16
    by_prompt = {}
    for r in records:
        q = next(q for q in questions if q["prompt"] == r["messages"][0]["content"])
        assert r["chosen"]["content"] == q["reference"] and reward("", r["rejected"]["content"], "") == 0.0
        by_prompt.setdefault(q["prompt"], []).append(r["rejected"]["content"])
    assert all(len(v) == len(set(v)) <= 2 for v in by_prompt.values())
    # the greedy reply, when wrong, is the first pair of its question
    greedy = engine.sample_groups(model, tok, [engine.user_prompt(tok, q["prompt"]) for q in questions], 1, 0.0, 0, 48)
    for q, g in zip(questions, greedy):
        text = engine.turn_text(tok, g)
        if reward("", text, "") == 0.0:
            assert by_prompt[q["prompt"]][0] == text
    args = ["--out_dir=weight/arith", "--prompts=data/arith/rl_train.jsonl", "--output=data/pairs.jsonl",
            "--reward=myreward:short", "--samples=2"]
    run_script("prepare/pairs.py", *args)
    mined = [json.loads(line) for line in open("data/pairs.jsonl", encoding="utf-8")]
    assert mined and all(set(r) == {"messages", "chosen", "rejected", "prompt", "reference", "group"} for r in mined)
    again = run_script("prepare/pairs.py", *args, check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    same = run_script("prepare/pairs.py", *args[:2], "--output=data/arith/rl_train.jsonl", "--overwrite", check=False)
    assert same.returncode != 0 and "input" in same.stderr
    run_script("prepare/dpo.py", "--input=data/pairs.jsonl", "--name=arith_dpo", "--base=data/arith_base",
               "--max_length=128", "--val_fraction=0.2")
    assert load_meta("data/arith_dpo")["task"] == "dpo"
    run_script("dpo.py", os.path.join(ROOT, "config", "dpo_arith.py"), "--out_dir=weight/arith_dpo", "--lora_rank=4",
               "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=2")
    assert any("val_rewards/accuracies" in r for r in read_log("weight/arith_dpo"))
