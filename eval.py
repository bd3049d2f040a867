"""
Evaluate like the field: loss, perplexity, bits per byte and next-token accuracy on any prepared
dataset; the classification report and a confusion-matrix picture for classifiers; generated
replies scored with BLEU, chrF, ROUGE and exact match; runs side by side; loss curves overlaid.

    python eval.py --out_dir=weight/<run> [--dataset=NAME --split=val]   # -> weight/<run>/eval.json
    python eval.py --out_dir=weight/<chat run> --generate [--prompts=FILE.jsonl]
    python eval.py --score FILE.jsonl [--out=metrics.json]     # {"prompt", "reference", "reply"} lines
    python eval.py --compare weight/a weight/b [...] [--out=compare.json]
    python eval.py --plot weight/a weight/b [...] [--out=curves.png]

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the scored tokens, so char,
GPT-2 and trained tokenizers compare on one scale; special tokens (no text) are left out of both
sums. Chinese and Japanese text is scored character by character (BLEU, ROUGE), because a
whitespace tokenizer would see one "word" per sentence, or none at all.
"""
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import grow_vocab
from classify import class_names, evaluate, loader_batches, report
from data import Examples, dataset_dir, is_example_dataset
from engine import load_for_inference, replies, turn_text
from files import atomic_write, claim_file
from settings import ConfigError, check_settings, cli, load_config, setting
from tokenizer import ROLE_TOKENS, from_meta, load_meta, render_conversation, same_base


@dataclass
class EvalConfig:
    out_dir: str = ""  # the run to evaluate (its best.pt, else ckpt.pt), or a Hugging Face folder
    dataset: str = ""  # "": the run's own dataset
    split: str = setting("val", choices=("train", "val"))
    batch_size: int = setting(16, lo=1)
    max_batches: int = setting(0, lo=0)  # 0: the whole split
    generate: bool = False  # chat models: reply to the val conversations (or --prompts) and score
    prompts: str = ""  # a JSONL of {"prompt", "reference"} to reply to instead
    max_examples: int = setting(200, lo=1)  # replies generated at most
    max_new_tokens: int = setting(256, lo=1)
    score: str = ""  # score this generations JSONL without a model
    out: str = ""  # where --score / --compare / --plot write (--score: beside its input; --compare: only when given)
    overwrite: bool = False  # replace an existing --out file
    device: str = "auto"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))
    threads: int = setting(0, lo=0)  # CPU threads; 0: the cores not busy with other work

    def __post_init__(self):
        check_settings(self)


# ----------------------------------------------------------------------------- language model

def token_bytes(tok, vocab_size: int) -> torch.Tensor:
    """(V,) UTF-8 length of each token's text; 0 for special tokens, which carry no text."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tok.vocab_size)):
        if i not in tok.id_to_special:
            lengths[i] = len(tok.decode_bytes([i]))
    return lengths


def window_batches(data_dir: str, split: str, block_size: int, batch_size: int, device: str):
    """Consecutive, non-overlapping windows covering a flat split once: (x, y, None)."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    starts = range(0, len(data) - block_size - 1 + 1, block_size)
    for lo in range(0, len(starts), batch_size):
        w = np.stack([data[s:s + block_size + 1] for s in starts[lo:lo + batch_size]]).astype(np.int64)
        w = torch.from_numpy(w).to(device)
        yield w[:, :-1], w[:, 1:], None


@torch.no_grad()
def lm_metrics(model, batches, lengths: torch.Tensor, run, max_batches: int = 0) -> dict:
    """Loss (nats per target token), perplexity, bits per byte and top-1 / top-5 next-token
    accuracy over every target (y != -1) of the batches."""
    lengths = lengths.to(run.device)
    sums = torch.zeros(5, dtype=torch.float64, device=run.device)  # loss, n, top1, top5, bits-loss
    text_bytes = torch.zeros((), dtype=torch.float64, device=run.device)
    for k, (x, y, _) in enumerate(batches):
        if max_batches and k >= max_batches:
            break
        with run.autocast:
            logits, _ = model(x)
        logits, y = logits.float().flatten(0, 1), y.flatten()
        keep = y != -1
        logits, y = logits[keep], y[keep]
        ce = F.cross_entropy(logits, y, reduction="none")
        top5 = logits.topk(min(5, logits.size(-1)), dim=-1).indices
        b = lengths[y]
        sums += torch.stack([ce.sum(), torch.tensor(float(len(y)), device=run.device),
                             (top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum(),
                             (ce * (b > 0)).sum()]).double()
        text_bytes += b.sum()
    loss, n, top1, top5, text_loss = sums.tolist()
    if n == 0:
        raise ConfigError("no targets to score in that split")
    return {"loss": loss / n, "ppl": math.exp(min(loss / n, 50)), "tokens": int(n),
            "bpb": text_loss / math.log(2) / max(1.0, text_bytes.item()),
            "top1_acc": top1 / n, "top5_acc": top5 / n}


def dataset_metrics(model, tok, ckpt: dict, cfg: EvalConfig, run) -> dict:
    name = cfg.dataset or ckpt["train_config"].get("dataset", "")
    data_dir = dataset_dir(name)
    T, V = model.config.block_size, model.config.vocab_size
    if is_example_dataset(data_dir):
        loader = Examples(data_dir, cfg.split, T, cfg.batch_size, V, shuffle=False)
        batches = (b for _, b in loader.iter_batches(run.device))
    else:
        batches = window_batches(data_dir, cfg.split, T, cfg.batch_size, run.device)
    metrics = lm_metrics(model, batches, token_bytes(tok, V), run, cfg.max_batches)
    return {"dataset": name, "split": cfg.split, **metrics}


# ----------------------------------------------------------------------------- classifiers

def classifier_metrics(model, ckpt: dict, cfg: EvalConfig, run, out_dir: str) -> dict:
    """sample.py --classify's report, plus confusion.png in the run folder."""
    meta = ckpt["tokenizer"]
    data_dir = dataset_dir(cfg.dataset or ckpt["train_config"]["dataset"])
    loader = Examples(data_dir, cfg.split, model.config.block_size, cfg.batch_size,
                      model.config.vocab_size, shuffle=False)
    out = evaluate(model, loader_batches(loader, run.device), meta, run.autocast)
    names = class_names(meta)
    result = report(out["pred"], out["label"], out["confidence"], len(meta["class_tokens"]), names)
    plot_confusion(np.array(result["confusion"]), names, os.path.join(out_dir, "confusion.png"))
    return result


def plot_confusion(confusion: np.ndarray, names: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(confusion, cmap="Blues")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > confusion.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- generation

CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"  # kana, Han, Hangul
CJK = re.compile(f"[{CJK_RANGES}]")
# a CJK character alone, or a run of other letters and digits: "58乘7" is 58 / 乘 / 7 (Han
# characters are word characters too, so a plain \w+ run would swallow them into one token)
WORD = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")


class CharAwareTokenizer:
    """ROUGE tokens: each CJK character alone, other letters and digits as lowercase words."""

    def tokenize(self, text: str) -> list[str]:
        return [t.lower() for t in WORD.findall(text)]


def score_records(records: list[dict]) -> dict:
    """BLEU and chrF (sacrebleu), ROUGE-1/2/L F1 (rouge-score with a CJK-aware tokenizer),
    exact match and lengths for [{"reference", "reply"}, ...]; records with a "group" (a language,
    a kind of question) also get exact match per group."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("scoring replies needs sacrebleu and rouge-score: "
                          "pip install sacrebleu rouge-score") from None
    refs = [r["reference"] for r in records]
    hyps = [r["reply"] for r in records]
    cjk = any(CJK.search(t) for t in refs)
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char" if cjk else "13a")
    chrf = sacrebleu.corpus_chrf(hyps, [refs])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharAwareTokenizer())
    rouge = [scorer.score(ref, hyp) for ref, hyp in zip(refs, hyps)]
    mean = lambda key: 100 * sum(r[key].fmeasure for r in rouge) / max(1, len(rouge))  # noqa: E731
    return {"n": len(records), "bleu": bleu.score, "chrf": chrf.score, "rouge1": mean("rouge1"),
            "rouge2": mean("rouge2"), "rougeL": mean("rougeL"),
            "exact_match": 100 * sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(1, len(records)),
            "reply_chars": sum(map(len, hyps)) / max(1, len(hyps)),
            "reference_chars": sum(map(len, refs)) / max(1, len(refs)), "tokenize": "char" if cjk else "13a",
            **exact_by_group(records)}


def exact_by_group(records: list[dict]) -> dict:
    groups = {}
    for r in records:
        if "group" in r:
            groups.setdefault(r["group"], []).append(r["reply"].strip() == r["reference"].strip())
    return {f"exact_match_{g}": 100 * sum(v) / len(v) for g, v in sorted(groups.items())}


def val_conversations(ckpt: dict, cfg: EvalConfig, tok) -> list[dict]:
    """(prompt ids, prompt text, reference) of each val conversation of the run's SFT dataset:
    everything up to the last assistant start is the prompt, that reply is the reference."""
    data_dir = dataset_dir(cfg.dataset or ckpt["train_config"]["dataset"])
    data = np.memmap(os.path.join(data_dir, f"{cfg.split}.bin"), dtype=np.uint16, mode="r")
    starts = np.fromfile(os.path.join(data_dir, f"{cfg.split}.idx"), dtype=np.uint64).astype(np.int64)
    ends = np.append(starts[1:], len(data))
    start = tok.token_id(ROLE_TOKENS["assistant"])
    items = []
    for s, e in zip(starts[:cfg.max_examples], ends[:cfg.max_examples]):
        ids = data[s:e].astype(np.int64).tolist()
        cut = len(ids) - 1 - ids[::-1].index(start)
        items.append({"ids": ids[:cut + 1], "prompt": tok.decode(ids[:cut + 1]), "reference": turn_text(tok, ids[cut + 1:])})
    return items


def jsonl_prompts(path: str, tok, limit: int) -> list[dict]:
    items = []
    for r in read_records(path, ("prompt", "reference"))[:limit]:
        ids, _ = render_conversation(tok, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        items.append({"ids": ids, **r})
    return items


def generate_replies(model, tok, items: list[dict], cfg: EvalConfig, run) -> list[dict]:
    """Greedy replies (engine.replies: as chat and serve decode them, 16 at a time in one
    batch), cut at the end of the turn."""
    from tqdm import tqdm
    out, step = [], 64
    for i in tqdm(range(0, len(items), step), desc="replies", unit_scale=step, disable=not sys.stderr.isatty()):
        chunk = items[i:i + step]
        texts = replies(model, tok, [item["ids"] for item in chunk], cfg.max_new_tokens, run)
        out += [{"prompt": item["prompt"], "reference": item["reference"], "reply": text,
                 **({"group": item["group"]} if "group" in item else {})} for item, text in zip(chunk, texts)]
    return out


# ----------------------------------------------------------------------------- runs side by side

def read_records(path: str, keys=("reference", "reply")) -> list[dict]:
    """The records of a JSONL file as {key: text} for keys (and "prompt", "" when absent); a
    line that is not such an object is an error naming file:line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                records.append({"prompt": str(r.get("prompt", "")), **{k: str(r[k]) for k in keys},
                                **({"group": str(r["group"])} if "group" in r else {})})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{path}:{n}: expected a JSON object with " +
                                  " and ".join(f'"{k}"' for k in keys)) from None
    return records


def write_json(path: str, obj) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def markdown_table(rows: dict[str, dict]) -> str:
    keys = [k for k in ("loss", "ppl", "bpb", "top1_acc", "top5_acc", "accuracy", "bleu", "chrf", "rouge1",
                        "rouge2", "rougeL", "exact_match") if any(k in r for r in rows.values())]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4g}" if k in r else "" for k in keys) + " |")
    return "\n".join(lines)


def compare(runs: list[str], cfg: EvalConfig) -> dict:
    """Each run's eval.json (computed now when missing), side by side as Markdown and JSON."""
    rows = {}
    for run_dir in runs:
        path = os.path.join(run_dir, "eval.json")
        if not os.path.exists(path):
            evaluate_run(EvalConfig(**{**cfg.__dict__, "out_dir": run_dir}))
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        rows[run_dir] = {k: v for k, v in result.items() if k != "run"}
    print(markdown_table(rows))
    if cfg.out:  # a file only when asked for: the table above is the answer
        claim_file(cfg.out, cfg.overwrite, inputs=tuple(os.path.join(r, "eval.json") for r in runs))
        write_json(cfg.out, rows)
        print(f"wrote {cfg.out}")
    return rows


def plot(runs: list[str], cfg: EvalConfig) -> str:
    """Train and val loss of every run in one picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run_dir in runs:
        with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        name = os.path.basename(run_dir.rstrip("/"))
        val = [(r["iter"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        train = [(r["iter"], r["train_loss"]) for r in records if "lr" in r and r.get("train_loss") is not None]
        line = ax.plot(*zip(*val), marker=".", label=f"{name} val")[0] if val else None
        if not val and not train:
            raise ConfigError(f"{run_dir}/log.jsonl has no losses to plot yet", "plot")
        if train:  # a single point gets a marker: a line of one point is drawn as nothing
            ax.plot(*zip(*train), alpha=0.35, color=line.get_color() if line else None, label=f"{name} train",
                    marker="." if len(train) < 2 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = cfg.out or "curves.png"
    claim_file(out, cfg.overwrite)
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return out


# ----------------------------------------------------------------------------- entry point

def evaluate_run(cfg: EvalConfig) -> dict:
    if not cfg.out_dir:
        raise ConfigError("give the run to evaluate: --out_dir=weight/<run>", "out_dir")
    model, tok, ckpt, run = load_for_inference(cfg.out_dir, cfg.device, cfg.dtype, threads=cfg.threads)
    if cfg.dataset:  # a base model scored on its SFT data: read the chat tokens the data appended
        meta = load_meta(dataset_dir(cfg.dataset))
        if not same_base(ckpt["tokenizer"], meta):
            raise ConfigError(f"--dataset={cfg.dataset} was not tokenized with {cfg.out_dir}'s tokenizer: its "
                              "scores would mean nothing (nothing was written); prepare it with the model's "
                              "tokenizer", "dataset")
        if meta["vocab_size"] > tok.vocab_size:
            new_ids = range(tok.vocab_size, meta["vocab_size"])
            if meta["vocab_size"] > model.config.vocab_size:
                # the chat tokens are new to this model: score it as sft.py starts from it, their
                # rows at the mean of the trained rows (the "before" of a before/after compare)
                model = grow_vocab(model, 64 * math.ceil(meta["vocab_size"] / 64), new_ids)
                print(f"{cfg.out_dir} lacks the ids {new_ids.start}..{new_ids.stop - 1} {cfg.dataset} appended "
                      "(chat tokens): scored as SFT starts from it, those rows at the mean row")
            tok = from_meta(meta)
    out_dir = cfg.out_dir if os.path.isdir(cfg.out_dir) else os.path.dirname(cfg.out_dir)
    result = {"run": cfg.out_dir}  # one flat record: the dataset's metrics, then the replies'
    if ckpt["tokenizer"].get("task") == "classify":
        result.update(classifier_metrics(model, ckpt, cfg, run, out_dir))
        print(f"accuracy {100 * result['accuracy']:.2f}% ({out_dir}/confusion.png)")
    elif cfg.dataset or ckpt["train_config"].get("dataset"):
        lm = dataset_metrics(model, tok, ckpt, cfg, run)
        result.update(lm)
        print(f"{lm['dataset']} {lm['split']}: loss {lm['loss']:.4f}, ppl {lm['ppl']:.2f}, bpb "
              f"{lm['bpb']:.4f}, top-1 {100 * lm['top1_acc']:.2f}%, top-5 {100 * lm['top5_acc']:.2f}%")
    if cfg.generate or cfg.prompts:
        items = jsonl_prompts(cfg.prompts, tok, cfg.max_examples) if cfg.prompts else val_conversations(ckpt, cfg, tok)
        records = generate_replies(model, tok, items, cfg, run)
        with atomic_write(os.path.join(out_dir, "generations.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        r = score_records(records)
        result.update(r)
        print(f"{r['n']} replies: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}, ROUGE-1/2/L {r['rouge1']:.2f}/"
              f"{r['rouge2']:.2f}/{r['rougeL']:.2f}, exact match {r['exact_match']:.1f}%"
              + "".join(f", {k.removeprefix('exact_match_')} {v:.1f}%" for k, v in r.items()
                        if k.startswith("exact_match_")))
    write_json(os.path.join(out_dir, "eval.json"), result)
    print(f"wrote {out_dir}/eval.json")
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--compare", "--plot"):  # a list of run folders, then --key=value
        mode = argv.pop(0)
        runs = [a for a in argv if not a.startswith("--")]
        cfg = load_config(EvalConfig, [a for a in argv if a.startswith("--")])
        if not runs:
            raise ConfigError(f"{mode} needs run folders: python eval.py {mode} weight/a weight/b")
        return compare(runs, cfg) if mode == "--compare" else plot(runs, cfg)
    cfg = load_config(EvalConfig, argv)
    if cfg.score:
        metrics = score_records(read_records(cfg.score))
        out = cfg.out or os.path.splitext(cfg.score)[0] + ".metrics.json"
        claim_file(out, cfg.overwrite or not cfg.out, inputs=(cfg.score,))  # its own default may be redone
        write_json(out, metrics)
        print(json.dumps(metrics, indent=1))
        print(f"wrote {out}")
        return metrics
    return evaluate_run(cfg)


if __name__ == "__main__":
    cli(main)
