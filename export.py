"""
Publish a run: a Hugging Face folder (transformers loads it), an ONNX file (onnxruntime runs it)
or a GGUF file (llama.cpp and Ollama run it).

    python export.py --out_dir=weight/<run> --format=hf --dest=DIR
    python export.py --out_dir=weight/<run> --format=onnx --dest=DIR
    python export.py --out_dir=weight/<run> --format=gguf --dest=DIR [--gguf_dtype=f16]
    python export.py --out_dir=weight/<lora_run> --merge --dest=weight/<merged_run>

hf writes config.json, model.safetensors, generation_config.json, the tokenizer files and a
model card (README.md: the architecture, the training config, the figures in log.jsonl).
GPT-2-layout runs become GPT2LMHeadModel, rope + rmsnorm + swiglu runs LlamaForCausalLM (or
Qwen2ForCausalLM for q/k/v-only biases); convert.py holds the mapping. onnx writes
DIR/model.onnx, token ids (batch, length) -> logits, both axes dynamic, and reports success only
after onnxruntime has reproduced PyTorch's logits on inputs of other shapes than the traced one.
gguf writes DIR/model.gguf (llama.cpp's gpt2, llama or qwen2 architecture, the tokenizer and chat
template inside; gguf_export.py holds the mapping) and DIR/Modelfile for `ollama create`.
--out_dir may also be a Hugging Face folder or a gpt2 name (to convert one to ONNX).
A LoRA run (adapters + a reference to its base) exports as the merged model: --merge writes it as
a plain danlu run (DEST/ckpt.pt, weights only, the adapters folded in), hf, onnx and gguf export it.
Mixture-of-experts runs have no Hugging Face class here: hf refuses them.
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import plain_checkpoint, save_checkpoint
from convert import ConvertError, hf_architecture, save_hf
from files import claim_folder, record_folder
from model import GPT, gpt_config
from settings import ConfigError, check_settings, cli, load_config, setting
from tokenizer import from_meta


@dataclass
class ExportConfig:
    out_dir: str = ""  # the run folder weight/<run> (or a Hugging Face folder, or a gpt2 name)
    format: str = setting("hf", choices=("hf", "onnx", "gguf"))
    dest: str = ""  # the folder to write into (created when missing)
    onnx_atol: float = setting(1e-4, above=0.0)  # largest |onnxruntime - PyTorch| logit accepted
    gguf_dtype: str = setting("f32", choices=("f32", "f16"))  # f16: matrices in float16 (half the file)
    merge: bool = False  # write a plain danlu run (LoRA adapters folded in) instead of --format
    overwrite: bool = False  # write into a --dest that holds other files (what export writes is replaced)

    def __post_init__(self):
        check_settings(self)


# ----------------------------------------------------------------------------- model card

def read_log(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def measured(out_dir: str) -> list[str]:
    """Markdown bullet lines of what the run measured: log.jsonl and cls_eval.json."""
    records = read_log(out_dir)
    steps = [r for r in records if "train_loss" in r and "lr" in r]
    evals = [r for r in records if "val_loss" in r]
    lines = []
    if steps:
        last = steps[-1]
        lines.append(f"- {last['iter']} iterations in {last.get('elapsed_s', 0):.0f} s; last train loss "
                     f"{last['train_loss']:.4f}")
        speeds = [r["tok_per_s"] for r in steps if r.get("tok_per_s")]
        if speeds:
            lines.append(f"- throughput {sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s (median of logged steps)")
    evals = [r for r in evals if r["iter"] > 0]  # iteration 0 scores the weights before any training
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        lines.append(f"- best val loss {best['val_loss']:.4f} at iteration {best['iter']} "
                     f"(last: {evals[-1]['val_loss']:.4f} at {evals[-1]['iter']})")
    cls_path = os.path.join(out_dir, "cls_eval.json")
    if os.path.isfile(cls_path):
        with open(cls_path, encoding="utf-8") as f:
            r = json.load(f)
        lines.append(f"- classification accuracy {100 * r['accuracy']:.2f}% on {r['n']} examples "
                     f"(mean confidence {r['mean_confidence']:.3f})")
    return lines or ["- no log.jsonl beside the checkpoint: nothing measured to report"]


def model_card(cfg: ExportConfig, ckpt: dict, architecture: str, n_params: int) -> str:
    train = ckpt.get("train_config") or {}
    meta, model = ckpt["tokenizer"], ckpt["model_config"]
    name = os.path.basename(os.path.normpath(cfg.out_dir))
    shape = ", ".join(f"{k} {model[k]}" for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size",
                                                  "vocab_size", "pos_emb", "norm", "mlp", "tie_embeddings"))
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [danlu]", "---",
             f"# {name}", "",
             f"A GPT of {n_params:,} parameters trained with danlu, exported as `{architecture}`.", "",
             f"- architecture: {shape}",
             f"- tokenizer: {meta['kind']}, {meta['vocab_size']} ids"
             + (f", special tokens {sorted(meta.get('special_tokens', {}))}" if meta.get("special_tokens") else ""),
             f"- data: `{train.get('dataset', 'unknown')}`"
             + (f", started from `{train['init_from']}`" if train.get("init_from") not in (None, "", "scratch") else ""),
             "", "## Measured (from the run's log)", *(measured(cfg.out_dir) if os.path.isdir(cfg.out_dir) else []),
             "", "## Use", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'tok = AutoTokenizer.from_pretrained("{cfg.dest}")',
             f'model = AutoModelForCausalLM.from_pretrained("{cfg.dest}")',
             'ids = tok("Hello", return_tensors="pt").input_ids',
             "print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=False)[0]))", "```"]
    if train:
        lines += ["", "## Training config", "```json", json.dumps(train, indent=1, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- ONNX

class Logits(torch.nn.Module):
    """The forward pass as ONNX sees it: token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def check_onnx(path: str, model: GPT, atol: float) -> float:
    """Largest |onnxruntime - PyTorch| logit over inputs whose shapes differ from the traced one;
    ConvertError when it exceeds atol."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    block, vocab = model.config.block_size, model.config.vocab_size
    worst = 0.0
    for shape in ((1, 1), (3, min(block, 13)), (2, block)):
        x = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
        got = torch.from_numpy(session.run(["logits"], {"input_ids": x.numpy()})[0])
        with torch.no_grad():
            want = model(x)[0]
        worst = max(worst, (got - want).abs().max().item())
        if not worst <= atol:
            raise ConvertError(f"{path}: onnxruntime's logits differ from PyTorch's by {worst:.2e} on input "
                               f"{shape} (tolerance {atol}); the file was not written")
    return worst


def export_onnx(model: GPT, dest: str, atol: float) -> tuple[str, float]:
    """Trace model to dest/model.onnx (atomically: into a temp folder, checked, then moved)."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError as e:
        raise ConvertError(f"--format=onnx needs {e.name}: pip install onnx onnxscript onnxruntime") from None
    import logging
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    block = model.config.block_size
    example = torch.randint(0, model.config.vocab_size, (2, min(block, 8)))
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=block)}}
    big = sum(p.numel() * 4 for p in model.parameters()) > 1.8e9  # protobuf's 2 GB limit
    tmp = os.path.join(dest, f".onnx.{os.getpid()}.tmp")
    os.makedirs(tmp, exist_ok=True)
    try:
        torch.onnx.export(Logits(model).eval(), (example,), os.path.join(tmp, "model.onnx"),
                          input_names=["input_ids"], output_names=["logits"], dynamic_shapes=dims,
                          dynamo=True, external_data=big, verbose=False)
        worst = check_onnx(os.path.join(tmp, "model.onnx"), model, atol)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "model.onnx"):  # the data file first
            os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(dest, "model.onnx"), worst


# ----------------------------------------------------------------------------- merged run

def write_merged(cfg: ExportConfig, ckpt: dict, t0: float) -> dict:
    """DEST/ckpt.pt: a plain run of the merged weights that sample.py, serve.py, export.py and
    --init_from read like any other (no optimizer state: it is not resumed)."""
    if "merged_from" not in ckpt:
        raise ConfigError(f"--merge: {cfg.out_dir} is not a LoRA run (it has no adapters to fold in); "
                          "export it with --format=hf|onnx", "merge")
    keep = ("model", "model_config", "train_config", "tokenizer", "iter_num", "best_val_loss", "merged_from")
    path = os.path.join(cfg.dest, "ckpt.pt")
    save_checkpoint(path, {k: ckpt[k] for k in keep if k in ckpt})
    print(f"wrote {path} ({time.perf_counter() - t0:.1f}s): {cfg.out_dir}'s adapters merged into "
          f"{ckpt['merged_from']['path']}")
    return {"path": path}


# ----------------------------------------------------------------------------- GGUF

def write_gguf(cfg: ExportConfig, ckpt: dict, config, command: str, t0: float) -> dict:
    from gguf_export import n_bytes, save_gguf
    written = save_gguf(config, ckpt["model"], ckpt["tokenizer"], cfg.dest, cfg.gguf_dtype,
                        os.path.basename(os.path.normpath(cfg.out_dir)), where=cfg.out_dir)
    record_folder(cfg.dest, command)
    for note in written.pop("notes"):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {written['path']} ({written['architecture']}, {cfg.gguf_dtype}, {n_bytes(written['path'])}, "
          f"{time.perf_counter() - t0:.1f}s) and {os.path.join(cfg.dest, 'Modelfile')}; run it with "
          f"llama-cli -m {written['path']} --jinja, or ollama create NAME -f {os.path.join(cfg.dest, 'Modelfile')}")
    return written


# ----------------------------------------------------------------------------- entry point

def main(argv=None) -> dict:
    cfg = load_config(ExportConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.out_dir or not cfg.dest:
        raise ConfigError("export.py needs --out_dir=weight/<run> (the run to export) and --dest=DIR "
                          "(the folder to write)")
    t0 = time.perf_counter()
    ckpt = plain_checkpoint(cfg.out_dir)  # a LoRA run: its base with the adapters merged
    from_meta(ckpt["tokenizer"])  # a tokenizer that does not load is an error before writing
    config = gpt_config(ckpt["model_config"])
    command = "export.py --merge" if cfg.merge else f"export.py --format={cfg.format}"
    claim_folder(cfg.dest, command, cfg.overwrite)  # before anything is written
    if cfg.merge:
        written = write_merged(cfg, ckpt, t0)
        record_folder(cfg.dest, command)
        return written
    if cfg.format == "gguf":
        return write_gguf(cfg, ckpt, config, command, t0)
    if cfg.format == "hf" and config.n_expert:
        raise ConvertError(f"{cfg.out_dir}: n_expert = {config.n_expert} (a mixture of experts) has no "
                           "Hugging Face class danlu exports to; use --format=onnx, or sample it with sample.py")
    os.makedirs(cfg.dest, exist_ok=True)
    if cfg.format == "onnx":
        model = GPT(dataclasses.replace(config, dropout=0.0))
        model.load_state_dict(ckpt["model"])
        path, worst = export_onnx(model.eval(), cfg.dest, cfg.onnx_atol)
        record_folder(cfg.dest, command)
        print(f"wrote {path} ({time.perf_counter() - t0:.1f}s); onnxruntime matches PyTorch within {worst:.1e}")
        return {"path": path, "max_abs_diff": worst}
    n_params = sum(t.numel() for k, t in ckpt["model"].items()
                   if not (k == "lm_head.weight" and config.tie_embeddings))
    card = model_card(cfg, ckpt, hf_architecture(config, cfg.out_dir), n_params)
    written = save_hf(config, ckpt["model"], ckpt["tokenizer"], cfg.dest, card, where=cfg.out_dir)
    record_folder(cfg.dest, command)
    print(f"wrote {cfg.dest} ({written}, {time.perf_counter() - t0:.1f}s): config.json, model.safetensors, "
          "generation_config.json, tokenizer.json, tokenizer_config.json, README.md")
    return {"path": cfg.dest, "architecture": written}


if __name__ == "__main__":
    cli(main)
