"""
Use a trained checkpoint: continue text, chat, or classify. Needs nothing but weight/<run>/ckpt.pt
(the tokenizer travels inside it).

    python sample.py --out_dir=weight/shakespeare_char_cpu --start="ROMEO:" [--num_samples=3]
    python sample.py --out_dir=weight/shakespeare_char_cpu --start=FILE:prompt.txt
    python sample.py --out_dir=weight/sft_alpaca --chat [--system="You are terse."]
    python sample.py --out_dir=weight/tiny_cls --classify [--split=val | --jsonl=FILE]
    python sample.py --out_dir=weight/tiny_cls --classify --image=PATH_OR_FOLDER
"""
import csv
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from classify import class_names, class_probs, class_token_ids, evaluate, loader_batches, report
from data import Examples, dataset_dir, dataset_path
from engine import chat_budget, decode_stream, fit_history, load_for_inference
from files import atomic_write
from images import ImageError, image_codebook, image_files, image_ids, image_pixels, read_image, read_token_examples
from settings import ConfigError, check_settings, cli, load_config, setting
from tokenizer import END_OF_TURN, ROLE_TOKENS, dropped_note


@dataclass
class SampleConfig:
    out_dir: str = "weight/shakespeare_char_cpu"  # a run folder (best.pt, else ckpt.pt) or a .pt file
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = setting(1, lo=1)
    max_new_tokens: int = setting(200, lo=1)
    temperature: float = setting(0.8, lo=0.0)  # 0: greedy
    top_k: int = setting(200, lo=0)  # 0: off
    top_p: float = setting(1.0, above=0.0, hi=1.0)  # nucleus: the smallest set holding this mass
    seed: int = 1337
    block_size: int = setting(0, lo=0)  # 0: the checkpoint's; smaller limits the context
    use_cache: bool = True
    utf8_constraint: bool = True  # byte-level tokenizers never write a broken character; False: plain sampling
    device: str = "auto"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))
    threads: int = setting(0, lo=0)  # CPU threads; 0: the cores not busy with other work
    # chat
    chat: bool = False
    system: str = ""
    # classification
    classify: bool = False
    split: str = setting("val", choices=("train", "val"))
    jsonl: str = ""  # classify the examples of this JSONL file instead of a split
    image: str = ""  # classify this image file, or every image under this folder
    skip_bad: bool = False  # --image folder: pass over unreadable images (counted) instead of stopping
    batch_size: int = setting(64, lo=1)

    def __post_init__(self):
        check_settings(self)


def load(cfg: SampleConfig):
    """(model, tokenizer, checkpoint, runtime) for cfg.out_dir."""
    return load_for_inference(cfg.out_dir, cfg.device, cfg.dtype, cfg.block_size, cfg.threads)


def encode_prompt(cfg: SampleConfig, tok, block_size: int) -> list[int]:
    text = cfg.start
    if text.startswith("FILE:"):
        with open(text[5:], encoding="utf-8") as f:
            text = f.read()
    ids = tok.encode(text)
    if not ids:
        if "<|endoftext|>" in tok.special_tokens:  # GPT-2 style: an empty prompt starts a document
            return [tok.special_tokens["<|endoftext|>"]]
        raise ConfigError("the prompt is empty (or has no character this model knows); "
                          "give one with --start=\"...\"")
    if len(ids) >= block_size:
        print(f"warning: the prompt has {len(ids)} tokens; keeping the last {block_size - 1} "
              f"(block_size {block_size})", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    return ids


def stream(model, tok, ids: list[int], cfg: SampleConfig, run, generator, stop_tokens=(), out=sys.stdout):
    """Generate after ids, writing text to out as it is made; return the new token ids
    (without a final stop token)."""
    new = []
    for t, text in decode_stream(model, tok, ids, run, generator, cfg.max_new_tokens, cfg.temperature,
                                 cfg.top_k, cfg.top_p, stop_tokens, cfg.use_cache, cfg.utf8_constraint):
        if t is not None and t not in stop_tokens:
            new.append(t)
        out.write(text)
        out.flush()
    return new


def sample_text(cfg: SampleConfig) -> None:
    model, tok, _, run = load(cfg)
    ids = encode_prompt(cfg, tok, model.config.block_size)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        sys.stdout.write(tok.decode(ids))
        stream(model, tok, ids, cfg, run, generator)
        sys.stdout.write("\n---------------\n" if i < cfg.num_samples - 1 else "\n")


# ----------------------------------------------------------------------------- chat

CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply"


class OneLine:
    """Piped chat output: a reply's newlines are written as the two characters \\n (and a
    backslash as \\\\), so each reply is exactly one line for the script reading it."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text.replace("\\", "\\\\").replace("\n", "\\n"))

    def flush(self) -> None:
        self.out.flush()


def chat(cfg: SampleConfig) -> None:
    model, tok, _, run = load(cfg)
    missing = [t for t in list(ROLE_TOKENS.values()) + [END_OF_TURN] if t not in tok.special_tokens]
    if missing:
        raise ConfigError(f"{cfg.out_dir} has no chat tokens {missing}: it is not a chat model. "
                          "Fine-tune it first with sft.py (see README, 'SFT and chat').")
    interactive = sys.stdin.isatty()
    end = tok.token_id(END_OF_TURN)
    block = model.config.block_size
    # keep room for the reply: at most half the context, and no more than max_new_tokens
    budget = chat_budget(block, cfg.max_new_tokens)
    if budget < 4:  # <|user|> one token <|end|> <|assistant|>
        raise ConfigError(f"block_size = {block} leaves {budget} tokens for the prompt; a chat turn "
                          "needs at least 4. Use a larger --block_size (or leave it at 0)", "block_size")
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = []  # the turns after the system turn
    out = sys.stdout if interactive else OneLine(sys.stdout)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    if interactive:
        print(f"danlu chat ({cfg.out_dir}). {CHAT_HELP}")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if text == "/help":
            print(CHAT_HELP)
            continue
        if not text:
            if not interactive:
                print(flush=True)  # piped: one output line per input line, even an empty one
            continue
        note = dropped_note(tok, text)
        if note:  # every character typed reaches the model or is named (stderr: piped replies stay one per line)
            print(note, file=sys.stderr)
        if not tok.encode(text):
            print("(this model's tokenizer knows no character of that message; nothing was sent)")
            continue
        history, ids = fit_history(tok, system, history + [{"role": "user", "content": text}], budget)
        try:
            reply = stream(model, tok, ids, cfg, run, generator, stop_tokens=(end,), out=out)
        except KeyboardInterrupt:  # stop this reply, keep the session
            reply = []
            print(" [stopped]", end="")
        print(flush=True)
        history.append({"role": "assistant", "content": tok.decode(reply)})


# ----------------------------------------------------------------------------- classify

def run_folder(out_dir: str) -> str:
    return out_dir if os.path.isdir(out_dir) else os.path.dirname(out_dir)


def classify(cfg: SampleConfig) -> dict:
    model, tok, ckpt, run = load(cfg)
    meta = ckpt["tokenizer"]
    if meta.get("task") != "classify":
        raise ConfigError(f"{cfg.out_dir} was not trained on a classification dataset "
                          "(its tokenizer has no class tokens)")
    if cfg.image:
        return classify_images(cfg, model, tok, ckpt, run)
    if cfg.jsonl:
        seqs, labels = read_token_examples(cfg.jsonl, tok, max_length=model.config.block_size + 1)
        batches, source = _jsonl_batches(seqs, labels, meta, cfg.batch_size, run.device), cfg.jsonl
    else:
        data_dir = dataset_dir(ckpt["train_config"]["dataset"])
        loader = Examples(data_dir, cfg.split, model.config.block_size, cfg.batch_size,
                          model.config.vocab_size, shuffle=False)
        batches, source = loader_batches(loader, run.device), f"{data_dir} {cfg.split}"
    out = evaluate(model, batches, meta, run.autocast)
    result = report(out["pred"], out["label"], out["confidence"], len(meta["class_tokens"]),
                    class_names(meta))
    result["source"] = source
    print_report(result)
    path = os.path.join(run_folder(cfg.out_dir), "cls_eval.json")
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(f"wrote {path}")
    return result


def _jsonl_batches(seqs, labels, meta, batch_size, device):
    """(x, y) batches of JSONL examples: x the sequence up to <CLS>, y with the label there."""
    specials, class_tokens = meta["special_tokens"], meta["class_tokens"]
    for lo in range(0, len(seqs), batch_size):
        chunk = [np.asarray(s[:-1]) for s in seqs[lo:lo + batch_size]]  # drop <EOS>: x ends at <CLS_k>
        L = max(len(s) for s in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -1, dtype=torch.long)
        for b, s in enumerate(chunk):
            x[b, :len(s)] = torch.from_numpy(s)
            y[b, len(s) - 2] = specials[class_tokens[labels[lo + b]]]  # target at the <CLS> slot
        yield x.to(device), y.to(device)


def print_report(r: dict) -> None:
    print(f"accuracy {100 * r['accuracy']:.2f}% on {r['n']} examples ({r['source']}), "
          f"mean confidence {r['mean_confidence']:.3f}")
    width = max(5, *(len(name) for name in r["per_class"]))
    print(f"{'class':>{width}}  precision  recall     f1  support")
    for name, m in r["per_class"].items():
        print(f"{name:>{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    print("confusion (rows: true class, columns: predicted; k is the k-th class above)")
    for k, row in enumerate(r["confusion"]):
        print(f"{k:>5}  " + " ".join(f"{v:4d}" for v in row))


def classify_images(cfg: SampleConfig, model, tok, ckpt, run) -> list[dict]:
    """Classify one image file, or every image under a folder: one line each (path, class,
    probability); for a folder, also <run>/cls_images.csv. An image inside a folder named
    after a class is scored against it, and the accuracy printed."""
    meta = ckpt["tokenizer"]
    dataset = ckpt.get("train_config", {}).get("dataset", "")
    try:
        book = image_codebook(meta, dataset_path(dataset))
    except ValueError as e:
        raise ConfigError(f"{cfg.out_dir}: {e}") from None
    if not os.path.exists(cfg.image):
        raise ConfigError(f"--image={cfg.image}: no such file or folder", "image")
    folder = os.path.isdir(cfg.image)
    paths = image_files(cfg.image, {}) if folder else [cfg.image]
    if not paths:
        raise ConfigError(f"--image={cfg.image}: no image files (PNG, JPEG, BMP, ...) in this folder", "image")
    names, rows, bad = class_names(meta), [], 0
    cls_id, ids_of_classes = meta["special_tokens"][meta["cls_token"]], class_token_ids(meta)
    for lo in range(0, len(paths), cfg.batch_size):
        batch, seqs = [], []
        for path in paths[lo:lo + cfg.batch_size]:
            try:
                pixels = image_pixels(read_image(path), book)
            except (ImageError, OSError) as e:
                if not (folder and cfg.skip_bad):
                    raise ConfigError(f"{path}: {e}" + ("; pass --skip_bad to pass over unreadable "
                                                        "images" if folder else "")) from None
                bad += 1
                continue
            batch.append(path)
            seqs.append(image_ids(tok, book, pixels, model.config.block_size))
        if not seqs:
            continue
        x = torch.tensor(seqs, dtype=torch.long, device=run.device)  # every image: the same length
        with run.autocast:
            probs = class_probs(model, x, cls_id, ids_of_classes).float().cpu()
        for path, p in zip(batch, probs):
            k = int(p.argmax())
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            rows.append({"path": path, "class": names[k], "probability": round(float(p[k]), 6),
                         "true_class": parent if folder and parent in names else ""})
            print(f"{path}\t{names[k]}\t{float(p[k]):.4f}")
    if not folder and rows:  # one image: show it as the model reads it, and what it was trained on
        sys.stdout.flush()
        print(seen_as(pixels, book, meta), file=sys.stderr)
    if folder:
        labelled = [r for r in rows if r["true_class"]]
        if labelled:
            right = sum(r["class"] == r["true_class"] for r in labelled)
            print(f"accuracy {100 * right / len(labelled):.2f}% on the {len(labelled)} images in "
                  "folders named after a class")
        path = os.path.join(run_folder(cfg.out_dir), "cls_images.csv")
        with atomic_write(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "class", "probability", "true_class"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path} ({len(rows)} images" + (f", {bad} unreadable skipped)" if bad else ")"))
    return rows


def seen_as(pixels: np.ndarray, book: dict, meta: dict) -> str:
    """The image as the classifier reads it (its training size and gray levels) in characters,
    and which images it was trained on: a picture unlike those (MNIST's 28 x 28 strokes given
    to the 8 x 8 digits model) is read poorly, and the grid shows why."""
    shades = " .:-=+*#%@"
    level = np.clip(pixels / max(1.0, float(book.get("max_value", 255))), 0, 1)
    rows = ["".join(shades[int(v * (len(shades) - 1))] * 2 for v in row) for row in level]
    source = meta.get("source", {}).get("data") or meta.get("source", {}).get("script", "its dataset")
    height, width = pixels.shape
    return ("\n".join(rows) + f"\nthe model read it as above: {height} x {width}, as its training images "
            f"({source}); a picture unlike those is read poorly")


def main(argv=None) -> None:
    cfg = load_config(SampleConfig, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.seed)
    if cfg.classify:
        classify(cfg)
    elif cfg.chat:
        chat(cfg)
    else:
        sample_text(cfg)


if __name__ == "__main__":
    cli(main)
