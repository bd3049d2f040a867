"""
Full supervised fine-tuning (SFT): a pretrained danlu checkpoint + an SFT dataset from
prepare/sft.py -> a chat model, trained by train.py's loop (the same one pretraining uses).

    python prepare/sft.py --input chats.jsonl --name my_sft --base data/<pretrain-dataset>
    python sft.py config/sft_alpaca.py [--key=value ...]
    python sample.py --out_dir=weight/sft_alpaca --chat

Batches are whole conversations, right-padded, with only assistant tokens (and their end-of-turn)
as targets, so the val loss is a loss on answers. When the chat tokens are new to the checkpoint,
the token embedding (and an untied head) grows to take them; new rows start at the mean of the
trained rows. The architecture comes from the checkpoint (dropout may change).
Re-running the same command continues an interrupted run exactly (init_from = auto: out_dir
holds a ckpt.pt of the same base and dataset); --init_from=scratch starts over from the base,
--init_from=resume insists on continuing. The keys mean what they mean in train.py; the
pretrained run is `base`.

    python sft.py config/sft_alpaca_lora.py        # LoRA: --lora_rank=R, the base frozen

With lora_rank > 0 only the adapters (and the rows of the new chat tokens) train; ckpt.pt and
best.pt hold just those, the LoRA keys and the base's path and weights hash.
"""
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from checkpoint import CheckpointError, base_model, base_reference, plain_checkpoint
from data import dataset_dir
from engine import reply, user_prompt
from lora import add_adapters, lora_config
from model import GPT, GPTConfig, gpt_config
from runtime import print0, setup_runtime
from settings import ConfigError, cli, load_config, setting
from tokenizer import from_meta, load_meta, same_base
from train import (TRAINING_ONLY, TrainConfig, add_lora, claim_run_folder, done_line, make_loaders,
                   model_config_for, prepare_run, report_trainable, resume_state, train)


@dataclass
class SFTConfig(TrainConfig):
    # Fields re-declared here change the default; the valid values stay those of TrainConfig.
    base: str = ""  # the pretrained model: weight/<run>, a .pt file, a Hugging Face folder or gpt2[-medium|-large|-xl]
    dataset: str = ""  # the SFT dataset, data/<name> from prepare/sft.py
    # auto: continue out_dir's SFT run if it has a ckpt.pt, else start from base | resume | scratch
    init_from: str = setting("auto", choices=("auto", "resume", "scratch"))
    epochs: float = setting(1.0, above=0.0)  # passes over the train conversations (when max_iters = 0)
    max_iters: int = setting(0, lo=0)  # 0: epochs * train examples // examples per iteration
    batch_size: int = 8
    learning_rate: float = 5e-5
    min_lr: float = 5e-6
    warmup_iters: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    eval_iters: int = 50
    sample_prompts: str = ""  # "|"-separated user turns; greedy replies are logged at each eval
    sample_max_new_tokens: int = setting(64, lo=1)


def describe(meta: dict) -> str:
    kind = meta.get("kind")
    if kind == "tiktoken":
        table = f"encoding {meta.get('encoding', 'gpt2')}"
    else:
        table = f"{len(meta.get('chars') or meta.get('tokens') or [])} {'characters' if kind == 'char' else 'tokens'}"
    return f"{kind} tokenizer ({table}, vocab_size {meta.get('vocab_size')})"


def check_tokenizer(base: dict, sft: dict, ckpt_path: str, data_dir: str, pretrain_data: str) -> range:
    """Raise unless the SFT data was tokenized with the checkpoint's tokenizer (plus appended
    tokens); return the ids that are new to the checkpoint."""
    same = same_base(base, sft)
    if not same:
        raise ConfigError(
            f"the SFT dataset {data_dir} uses a {describe(sft)}, but the checkpoint {ckpt_path} "
            f"was trained with a {describe(base)}. Prepare the SFT data on the checkpoint's "
            f"tokenizer: python prepare/sft.py --input ... --name ... --base data/{pretrain_data}")
    return range(base["vocab_size"], sft["vocab_size"])


def sft_model_config(cfg: SFTConfig, saved: dict, vocab_size: int) -> GPTConfig:
    """The checkpoint's architecture (vocab grown to vocab_size) with cfg's training-only keys.
    A key left at its default takes the checkpoint's value; one set to another value is an error.
    cfg is updated to the architecture actually trained, so config.json and ckpt.pt tell the truth."""
    defaults = SFTConfig()
    for f in dataclasses.fields(GPTConfig):
        if f.name in TRAINING_ONLY or f.name not in saved:
            continue
        mine = getattr(cfg, f.name)
        want = max(saved[f.name], vocab_size) if f.name == "vocab_size" else saved[f.name]
        if f.name == "block_size" and mine != getattr(defaults, f.name) and mine <= want:
            want = mine  # a shorter context fits the trained positions (1024 for GPT-2, ...)
        if mine != getattr(defaults, f.name) and mine != want:
            raise ConfigError(f"{f.name} = {mine!r}, but the pretrained checkpoint {cfg.base} "
                              f"has {f.name} = {want!r}; the architecture comes from the "
                              f"checkpoint (only {', '.join(TRAINING_ONLY)} and a smaller block_size "
                              "may change). Remove the key.")
        setattr(cfg, f.name, want)
    return gpt_config(cfg)


def sample_replies(prompts: list[str], tok, cfg: SFTConfig, run):
    """extra_eval for train(): greedy replies to fixed prompts, as {"samples": [...]}."""

    @torch.no_grad()
    def extra_eval(model: GPT) -> dict:
        if not run.master or not prompts:
            return {}
        was_training = model.training
        model.eval()  # no dropout while sampling
        samples = []
        for prompt in prompts:
            samples.append({"prompt": prompt, "reply": reply(model, tok, user_prompt(tok, prompt),
                                                             cfg.sample_max_new_tokens, run)})
            print0(f"  sample: {prompt!r} -> {samples[-1]['reply']!r}")
        model.train(was_training)
        return {"samples": samples}
    return extra_eval


def start_model(cfg: SFTConfig, run, model_cfg: GPTConfig, pretrained: dict, new_ids: range):
    """(model, state, LoRA base reference or None): out_dir's SFT checkpoint and its state when
    resuming, else the pretrained model with its vocabulary grown (and new adapters) and no
    state. A LoRA run resumes only on the base whose weights it was trained on."""
    state = resume_state(cfg, run, model_cfg)
    reference = base_reference(cfg.base, pretrained) if cfg.lora_rank else None
    if state is not None:
        was = state["train_config"]
        if was.get("base") != cfg.base:
            raise ConfigError(f"{cfg.out_dir} holds an SFT run of {was.get('base')}, not of "
                              f"{cfg.base}; pick another out_dir, or --init_from=scratch --overwrite to replace it")
        if reference is not None and reference["sha256"] != state["lora_base"]["sha256"]:
            raise CheckpointError(f"{cfg.out_dir} holds LoRA adapters of an earlier {cfg.base} (its weights "
                                  "changed since); put that base back, or train new adapters on this one in "
                                  "another out_dir")
        if reference is not None:
            model = add_adapters(base_model(pretrained, model_cfg, new_ids), lora_config(cfg), state.pop("model"))
            report_trainable(model)
        else:
            model = GPT(model_cfg)
            model.load_state_dict(state.pop("model"))
        print0(f"resuming {cfg.out_dir}/ckpt.pt at iter {state['iter_num']} of {cfg.max_iters}")
        return model, state, reference
    model = base_model(pretrained, model_cfg, new_ids)
    print0(f"from {cfg.base} (iter {pretrained.get('iter_num')}); "
           f"new token ids {list(new_ids) or 'none'}, vocab_size {model_cfg.vocab_size}")
    if reference is not None:
        model = add_lora(model, cfg, new_ids)
    return model, None, reference


def fine_tune_setup(cfg: SFTConfig, run, data_dir: str, meta: dict, loaders_for):
    """What a fine-tune (sft.py, dpo.py) does before training: read the base (a LoRA run merged),
    check the data's tokenizer against it, grow the vocabulary, build the loaders
    (loaders_for(cfg, data_dir, meta, run, vocab_size)), turn epochs into max_iters, claim the
    run folder. Returns (base checkpoint, new token ids, model config, loaders, examples per iter)."""
    if cfg.out_dir and os.path.abspath(cfg.out_dir) == os.path.abspath(cfg.base):
        raise ConfigError(f"out_dir = {cfg.out_dir} is the base run itself; a fine-tune writes a new run: "
                          "give another out_dir (e.g. weight/sft_<name>)", "out_dir")
    pretrained = plain_checkpoint(cfg.base)  # a danlu run (LoRA: merged), a Hugging Face folder or a gpt2 name
    new_ids = check_tokenizer(pretrained["tokenizer"], meta, cfg.base, data_dir,
                              pretrained.get("train_config", {}).get("dataset", "<pretrain-name>"))
    padded = model_config_for(dataclasses.replace(cfg, vocab_size=0), meta).vocab_size  # train.py's rule
    if cfg.lora_rank:  # the new chat tokens' rows train beside the adapters
        cfg.lora_new_tokens_from = new_ids.start if len(new_ids) else 0
    model_cfg = sft_model_config(cfg, pretrained["model_config"], padded)
    loaders = loaders_for(cfg, data_dir, meta, run, model_cfg.vocab_size)
    per_iter = cfg.batch_size * cfg.gradient_accumulation_steps
    if cfg.max_iters == 0:  # a batch never straddles two epochs, so an epoch is n // per_iter
        cfg.max_iters = max(1, round(cfg.epochs * (len(loaders["train"]) // per_iter)))
    prepare_run(cfg, run)
    claim_run_folder(cfg, run)
    return pretrained, new_ids, model_cfg, loaders, per_iter


def main(argv=None) -> dict:
    cfg = load_config(SFTConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.base or not cfg.dataset:
        raise ConfigError("sft.py needs base (the pretrained run folder, weight/<run>) and "
                          "dataset (the SFT data from prepare/sft.py)")
    run = setup_runtime(cfg.device, cfg.dtype, cfg.threads, cfg.dist_timeout)
    data_dir = dataset_dir(cfg.dataset)
    meta = load_meta(data_dir)
    if not os.path.exists(os.path.join(data_dir, "train.mask.bin")):
        raise ConfigError(f"{data_dir} has no loss masks: it is not an SFT dataset. Make one with "
                          f"python prepare/sft.py --input FILE --name NAME --base data/<pretrain>")
    pretrained, new_ids, model_cfg, loaders, per_iter = fine_tune_setup(cfg, run, data_dir, meta, make_loaders)

    model, state, lora_base = start_model(cfg, run, model_cfg, pretrained, new_ids)
    del pretrained
    model.to(run.device)
    if run.threads_note:
        print0(run.threads_note)
    print0(f"SFT: {len(loaders['train'])} train conversations, {per_iter} per iter, "
           f"{cfg.max_iters} iters ({cfg.max_iters * per_iter / len(loaders['train']):.2f} epochs)")
    prompts = [p.strip() for p in cfg.sample_prompts.split("|") if p.strip()]
    summary = train(cfg, run, model, loaders, meta, state, sample_replies(prompts, from_meta(meta), cfg, run),
                    lora_base)
    print0(f"{done_line(summary, cfg.out_dir)}\nchat with: python sample.py --out_dir={cfg.out_dir} --chat")
    return summary


if __name__ == "__main__":
    cli(main)
