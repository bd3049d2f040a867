"""dpo.py and prepare/dpo.py: pairs share their prompt and only the reply is a target; the loss
is log 2 per pair while policy == reference; TRL computes the same loss, gradient and rewards
from the same log-probabilities; 8 x 1 == 4 x 2; resume in a new process is exact; with LoRA the
reference is the model with its adapters off; a short run raises held-out preference accuracy."""
import copy
import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dpo
import train
from checkpoint import base_model, load_checkpoint
from conftest import ROOT, read_log, run_script, shared_path, step_losses, write_char_dataset
from lora import LoRAConfig, add_adapters
from model import gpt_config
from prepare.dpo import build_dpo_dataset
from tokenizer import CHAT_TOKENS, from_meta, load_meta, render_conversation

SYSTEM = "be brief."


def pref_records(n: int, seed: int = 0) -> list[dict]:
    """LLaMA-Factory records: "add a b" answered "a+b=c!" (chosen) or "a+b=c." (rejected, what the
    base's text has after a sum); some open with a system turn and an earlier exchange."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        turns = [{"from": "human", "value": f"add {a} {b}"}]
        if rng.random() < 0.2:
            turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi!"}] + turns
        record = {"conversations": turns, "chosen": {"from": "gpt", "value": f"{a}+{b}={a + b}!"},
                  "rejected": {"from": "gpt", "value": f"{a}+{b}={a + b}."}}
        if rng.random() < 0.2:
            record["system"] = SYSTEM
        records.append(record)
    return records


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """data/base (a char corpus of sums), weight/base (20 iterations on it) and data/prefs (200
    pairs, 20% val); the tests run in this folder."""
    folder = tmp_path_factory.mktemp("dpo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        rng = random.Random(1)
        text = " ".join(f"add {(a := rng.randrange(10))} {(b := rng.randrange(10))} {a}+{b}={a + b}. hi! be brief?"
                        for _ in range(600))
        write_char_dataset("data/base", text, 2000)
        train.main(["--dataset=base", "--out_dir=weight/base", "--device=cpu", "--n_layer=2", "--n_head=2",
                    "--n_embd=32", "--block_size=64", "--batch_size=8", "--max_iters=20", "--eval_interval=20",
                    "--eval_iters=1", "--learning_rate=3e-3", "--warmup_iters=2"])
        with open("prefs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in pref_records(200))
        build_dpo_dataset(["prefs.jsonl"], "data/base", "data/prefs", max_length=65, val_fraction=0.2)
        yield folder


ARGS = ["--base=weight/base", "--dataset=prefs", "--device=cpu", "--batch_size=8", "--learning_rate=1e-3",
        "--min_lr=1e-4", "--warmup_iters=0", "--eval_iters=2", "--log_interval=1", "--sample_prompts="]


def model_and_batch(n_pairs: int = 4):
    """The base grown to the chat tokens (what dpo.py starts from) and a batch of n_pairs val pairs."""
    meta, ckpt = load_meta("data/prefs"), load_checkpoint("weight/base")
    config = gpt_config(ckpt["model_config"], vocab_size=meta["vocab_size"])
    model = base_model(ckpt, config, range(ckpt["tokenizer"]["vocab_size"], meta["vocab_size"]))
    x, y, _ = dpo.Pairs("data/prefs", "val", 64, n_pairs, meta["vocab_size"], shuffle=False).collate(range(n_pairs))
    return model, x, y


# ----------------------------------------------------------------------------- data

def test_pairs_share_the_prompt_and_only_the_reply_is_a_target(work):
    tok = from_meta(load_meta("data/prefs"))
    meta = load_meta("data/prefs")
    assert meta["task"] == "dpo" and meta["vocab_size"] == load_meta("data/base")["vocab_size"] + len(CHAT_TOKENS)
    source = meta["source"]
    assert source["kept"] == 200 and sum(s["pairs"] for s in source["splits"].values()) == 200
    assert 30 <= source["splits"]["val"]["pairs"] <= 50
    ids = np.fromfile("data/prefs/train.bin", dtype=np.uint16).astype(np.int64)
    masks = np.fromfile("data/prefs/train.mask.bin", dtype=np.uint8)
    starts = np.append(np.fromfile("data/prefs/train.idx", dtype=np.uint64).astype(np.int64), len(ids))
    records = pref_records(200)
    multi = 0
    for i in range(0, len(starts) - 1, 2):
        chosen, rejected = (slice(starts[j], starts[j + 1]) for j in (i, i + 1))
        # the record this pair came from: the one whose rendering it is
        text = tok.decode(ids[chosen].tolist())
        record = next(r for r in records if r["chosen"]["value"] in text and r["conversations"][-1]["value"] in text
                      and (SYSTEM in text) == ("system" in r) and ("hi!" in text) == (len(r["conversations"]) > 1))
        prompt = ([{"role": "system", "content": SYSTEM}] if "system" in record else []) + [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in record["conversations"]]
        n = len(render_conversation(tok, prompt)[0])
        for part, reply in ((chosen, record["chosen"]), (rejected, record["rejected"])):
            want = render_conversation(tok, prompt + [{"role": "assistant", "content": reply["value"]}])[0]
            assert ids[part].tolist() == want
            assert masks[part].tolist() == [0] * (n + 1) + [1] * (len(want) - n - 1)  # <|assistant|> is not a target
        assert ids[chosen][:n].tolist() == ids[rejected][:n].tolist()
        multi += len(prompt) > 2
    assert multi > 10  # earlier assistant turns ("hi!") were in prompts, and not targets


def test_a_batch_is_chosen_rows_then_rejected_rows(work):
    meta = load_meta("data/prefs")
    tok = from_meta(meta)
    pairs = dpo.Pairs("data/prefs", "train", 64, 3, meta["vocab_size"], shuffle=False)
    assert len(pairs) == len(pairs.starts) // 2 == 200 - meta["source"]["splits"]["val"]["pairs"]
    x, y, w = pairs.collate([0, 1, 2])
    assert x.shape[0] == 6 and w is None
    for k in range(3):
        chosen, rejected = (tok.decode([t for t in y[r].tolist() if t != -1]) for r in (k, k + 3))
        assert chosen.endswith("!<|end|>") and rejected.endswith(".<|end|>") and chosen[:-8] == rejected[:-8]
    lengths = pairs.ends - pairs.starts
    assert np.array_equal(pairs.lengths(), np.maximum(lengths[0::2], lengths[1::2]))


def test_the_real_preference_file_gives_one_pair_per_record(tmp_path):
    """../shared/data/sft/dpo_zh_demo.json (LLaMA-Factory, 300 records, 64 with two user turns)
    on a char base of its own characters: every record is a pair, none is cut."""
    path = shared_path("data", "sft", "dpo_zh_demo.json")
    records = json.load(open(path, encoding="utf-8"))
    chars = sorted(set(json.dumps(records, ensure_ascii=False)) | set(" \n"))
    write_char_dataset(str(tmp_path / "zh_base"), "".join(chars) * 2, len(chars))
    summary = build_dpo_dataset([path], str(tmp_path / "zh_base"), str(tmp_path / "zh_dpo"), max_length=20000)
    assert summary["kept"] == summary["records_read"] == 300 and summary["truncated"] == 0
    assert summary["splits"]["val"]["pairs"] == 15


# ----------------------------------------------------------------------------- the loss

def test_the_loss_is_log_2_per_pair_while_policy_is_reference(work):
    model, x, y = model_and_batch(4)
    for smoothing in (0.0, 0.2):
        objective = dpo.DPO(model, dpo.frozen(copy.deepcopy(model)), beta=0.1, label_smoothing=smoothing)
        loss, aux = objective(x, y)
        assert aux is None and objective.count(y).item() == 4
        assert loss.item() == pytest.approx(4 * math.log(2), rel=1e-6)
    # the reference gets no gradient and is no submodule: the loop optimizes and saves the policy only
    loss.backward()
    assert all(p.grad is None for p in objective.reference.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(n.startswith("reference") for n, _ in objective.named_parameters())


def trl_loss(policy_tokens, completion_mask, ref_chosen, ref_rejected, beta):
    """TRL's DPOTrainer._compute_loss (trl 1.x; its loss is inlined there) on per-token policy
    log-probabilities we hand it through a stand-in model, the reference's precomputed."""
    from trl import DPOTrainer
    R, T = completion_mask.shape
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t))
    zeros = torch.zeros(R, T - 1)
    outputs = SimpleNamespace(log_probs=policy_tokens, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    inputs = {"input_ids": torch.zeros(R, T, dtype=torch.long), "attention_mask": torch.ones(R, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}


def test_loss_gradient_and_rewards_equal_trl():
    pytest.importorskip("trl")
    from trl import DPOTrainer
    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this trl has no DPOTrainer._compute_loss (written against trl 1.16)")
    torch.manual_seed(0)
    B, T = 6, 12
    completion_mask = (torch.arange(T) >= torch.randint(3, 8, (2 * B, 1))).long()  # (2B, T)
    tokens = (-3 * torch.rand(2 * B, T - 1) * completion_mask[:, 1:]).requires_grad_()  # (2B, T-1)
    ref = -3 * torch.rand(2 * B) * completion_mask.sum(1)
    beta = 0.3
    expected, rewards = trl_loss(tokens, completion_mask, *ref.chunk(2), beta)
    (expected_grad,) = torch.autograd.grad(expected, tokens)
    loss, chosen, rejected = dpo.dpo_loss(*tokens.sum(1).chunk(2), *ref.chunk(2), beta)
    mean = loss.sum() / B  # what the loop makes of the summed loss: a mean over the step's pairs
    (grad,) = torch.autograd.grad(mean, tokens)
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    mine = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}
    assert rewards.keys() == mine.keys()
    for k in mine:
        assert mine[k].item() == pytest.approx(rewards[k], rel=1e-6), k


def test_label_smoothing_is_conservative_dpo():
    """cDPO (Mitchell 2023): the label is taken as flipped with probability eps, and the loss at a
    margin z is -(1 - eps) log sigmoid(z) - eps log sigmoid(-z); its gradient vanishes where
    sigmoid(z) = 1 - eps instead of only as z grows without bound."""
    z = torch.tensor([math.log(0.9 / 0.1)], requires_grad=True)  # sigmoid(z) = 0.9
    loss, _, _ = dpo.dpo_loss(z, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_smoothing=0.1)
    loss.backward()
    assert abs(z.grad.item()) < 1e-7
    plain, _, _ = dpo.dpo_loss(z, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0)
    assert plain.item() == pytest.approx(-math.log(0.9), rel=1e-6)


# ----------------------------------------------------------------------------- runs

def test_a_short_run_raises_held_out_preference_accuracy(work):
    """The base prefers "." after a sum; on prompts it never trained on, DPO turns that around."""
    dpo.main(ARGS + ["--out_dir=weight/dpo", "--max_iters=20", "--eval_interval=10"])
    evals = [r for r in read_log("weight/dpo") if "val_loss" in r]
    first, last = evals[0], evals[-1]
    for split in ("train", "val"):  # policy == reference at the start: no margin, ties are not wins
        assert first[f"{split}_loss"] == pytest.approx(math.log(2), rel=1e-6)
        assert first[f"{split}_rewards/margins"] == 0 and first[f"{split}_rewards/accuracies"] == 0
    assert first["val_logps/accuracies"] <= 0.1 and last["val_logps/accuracies"] >= 0.9, (first, last)
    assert last["iter"] == 20 and last["val_rewards/accuracies"] >= 0.9, last
    assert last["val_rewards/margins"] > 0 and last["val_loss"] < 0.9 * math.log(2)
    assert last["val_rewards/margins"] == pytest.approx(last["val_rewards/chosen"] - last["val_rewards/rejected"])


def test_micro_batching_and_processes_do_not_change_the_step(work):
    """batch 8 x 1 == 4 x 2 == 2 processes x 4: the loss is summed over pairs and divided by the
    step's pairs; under DDP the reference stays outside the wrapped module."""
    step = ARGS + ["--max_iters=3", "--eval_interval=100", "--group_by_length=False"]
    for (batch, accum), name in {(8, 1): "a", (4, 2): "b"}.items():
        dpo.main(step + [f"--batch_size={batch}", f"--gradient_accumulation_steps={accum}", f"--out_dir=weight/{name}"])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "dpo.py"), *step, "--batch_size=4", "--gradient_accumulation_steps=2",
                        "--out_dir=weight/c"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = ([loss for _, loss in step_losses(f"weight/{n}")] for n in "abc")
    assert len(a) == 3 and np.allclose(a, b, rtol=1e-6, atol=0) and np.allclose(a, c, rtol=1e-6, atol=0), (a, b, c)
    # The two add the same terms in another order (float32: ~1e-7 relative), and AdamW divides by
    # sqrt(v): where the gradient is float noise (the key bias, which softmax ignores) that moves a
    # weight by up to ~lr * 1e-3 a step, as in test_moe.py. Measured here: 1.9e-6 at most.
    wa, wb, wc = (load_checkpoint(f"weight/{n}")["model"] for n in "abc")
    assert all(torch.allclose(wa[k], w[k], rtol=0, atol=1e-5) for w in (wb, wc) for k in wa)


def test_resume_in_a_new_process_is_exact(work):
    """6 iterations straight, or 3 and then 3 more in a new process (dropout on): the same losses
    and weights, bit for bit; the reference is the base again, not the resumed weights."""
    common = ARGS + ["--lr_decay_iters=6", "--eval_interval=3", "--dropout=0.1"]
    run_script("dpo.py", *common, "--out_dir=weight/whole", "--max_iters=6")
    run_script("dpo.py", *common, "--out_dir=weight/parts", "--max_iters=3")
    run_script("dpo.py", *common, "--out_dir=weight/parts", "--max_iters=6")
    whole, parts = step_losses("weight/whole"), step_losses("weight/parts")
    assert [i for i, _ in parts] == list(range(1, 7)) and parts == whole
    a, b = (load_checkpoint(f"weight/{d}/ckpt.pt")["model"] for d in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_reference_is_the_model_with_adapters_off(work):
    model, x, y = model_and_batch(4)
    lora = add_adapters(copy.deepcopy(model), LoRAConfig(lora_rank=4, lora_targets="q,k,v,o,mlp_in,mlp_out,head"))
    objective = dpo.DPO(lora, None, beta=0.1)
    with torch.no_grad():  # step 0: B = 0, so the policy is its reference to the last bit
        assert torch.equal(dpo.reply_logps(lora, x, y), objective.reference_logps(x, y))
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        assert not torch.equal(dpo.reply_logps(lora, x, y), objective.reference_logps(x, y))
        assert torch.equal(objective.reference_logps(x, y), dpo.reply_logps(model, x, y))  # adapters off == base
    assert lora.training and "forward" not in vars(lora.lm_head)  # the switch is undone
    # a LoRA run: at its first evaluation the rewards are exactly zero; adapters train, the base does not
    dpo.main(ARGS + ["--out_dir=weight/lora", "--lora_rank=4", "--max_iters=10", "--eval_interval=10",
                     "--learning_rate=3e-3"])
    evals = [r for r in read_log("weight/lora") if "val_loss" in r]
    assert evals[0]["val_rewards/chosen"] == evals[0]["val_rewards/rejected"] == 0
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert evals[-1]["train_rewards/margins"] > 0
    ckpt = load_checkpoint("weight/lora")
    assert ckpt["lora_base"]["path"] == "weight/base" and all("lora_" in k for k in ckpt["model"])
    # resumed, it rebuilds the same reference (the base, adapters off): iter 10 scores the same
    dpo.main(ARGS + ["--out_dir=weight/lora", "--lora_rank=4", "--max_iters=12", "--eval_interval=10",
                     "--learning_rate=3e-3"])
    again = next(r for r in read_log("weight/lora") if r["iter"] == 10 and "val_loss" in r)
    assert again["val_loss"] == evals[-1]["val_loss"]
    assert again["val_rewards/margins"] == evals[-1]["val_rewards/margins"]
