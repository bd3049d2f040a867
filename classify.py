"""
Classification with a causal LM: an example is `<IMG> codes </IMG> <CLS> <CLS_k> <EOS>`, and
the predicted class is read at the `<CLS>` position: with cls_head="lm", the most likely class
token of the next-token distribution there (softmax over the class tokens only); with "mlp",
the model's classification head on the <CLS> hidden state. Used by train.py (val accuracy at
each eval), by `sample.py --classify` (the full report, written to cls_eval.json; --image for
image files) and by serve.py. How an image becomes that input is images.py.
"""
import numpy as np
import torch


def class_token_ids(meta: dict) -> list[int]:
    specials = meta["special_tokens"]
    return [specials[name] for name in meta["class_tokens"]]


def class_names(meta: dict) -> list[str]:
    """The name of each class: the dataset's (image folder names) or, for data prepared before
    names were recorded, the k of <CLS_k>."""
    if meta.get("class_names"):
        return list(meta["class_names"])
    return [t[len("<CLS_"):-1] if t.startswith("<CLS_") else t for t in meta["class_tokens"]]


# ----------------------------------------------------------------------------- predictions


def cls_positions(x: torch.Tensor, cls_id: int) -> torch.Tensor:
    """(B,) index of the last <CLS> in each row of x (B, T); every row must have one."""
    hit = x == cls_id
    if not bool(hit.any(dim=1).all()):
        raise ValueError("an example has no <CLS> token; it cannot be classified")
    T = x.size(1)
    return T - 1 - hit.flip(dims=[1]).int().argmax(dim=1)


@torch.no_grad()
def class_probs(model, x: torch.Tensor, cls_id: int, class_ids: list[int]) -> torch.Tensor:
    """(B, K) probabilities over the K classes at each row's <CLS> position, from either head."""
    pos = cls_positions(x, cls_id)
    h = model.body(x)  # (B, T, C)
    h = h[torch.arange(x.size(0), device=x.device), pos]  # (B, C): only the <CLS> position
    if model.config.cls_head == "mlp":
        logits = model.cls_mlp(h).float()  # (B, K), classes in class_ids' order
    else:
        logits = model.head(h).float()[:, class_ids]  # (B, K)
    return torch.softmax(logits, dim=-1)


def batch_labels(x: torch.Tensor, y: torch.Tensor, cls_id: int, class_ids: list[int]) -> torch.Tensor:
    """The class index of each row: its target at the <CLS> position (-1 if not a class token)."""
    answer = y[torch.arange(x.size(0), device=x.device), cls_positions(x, cls_id)]
    lookup = torch.full((int(max(class_ids)) + 2,), -1, dtype=torch.long, device=x.device)
    lookup[torch.tensor(class_ids, device=x.device)] = torch.arange(len(class_ids), device=x.device)
    return lookup[answer.clamp(min=-1)]


def evaluate(model, batches, meta: dict, autocast) -> dict:
    """Run every (x, y) batch; return predictions, labels and confidences as numpy arrays."""
    cls_id, class_ids = meta["special_tokens"][meta["cls_token"]], class_token_ids(meta)
    preds, labels, conf = [], [], []
    was_training = model.training
    model.eval()
    for x, y in batches:
        with autocast:
            p = class_probs(model, x, cls_id, class_ids)
        top = p.max(dim=-1)
        preds.append(top.indices.cpu())
        conf.append(top.values.cpu())
        labels.append(batch_labels(x, y, cls_id, class_ids).cpu())
    model.train(was_training)
    return {"pred": torch.cat(preds).numpy(), "label": torch.cat(labels).numpy(),
            "confidence": torch.cat(conf).numpy()}


def report(pred: np.ndarray, label: np.ndarray, confidence: np.ndarray, num_classes: int,
           names: list[str] | None = None) -> dict:
    """Accuracy, per-class precision / recall / F1 / support keyed by class name (default: the
    index), confusion matrix (rows: true class, columns: predicted, in class_names order),
    mean confidence of the predicted class."""
    names = names or [str(k) for k in range(num_classes)]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    known = label >= 0
    np.add.at(confusion, (label[known], pred[known]), 1)
    per_class = {}
    for k in range(num_classes):
        tp = confusion[k, k]
        precision = tp / max(1, confusion[:, k].sum())
        recall = tp / max(1, confusion[k].sum())
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class[names[k]] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                             "f1": round(float(f1), 4), "support": int(confusion[k].sum())}
    n = int(known.sum())
    return {"accuracy": float(np.trace(confusion) / max(1, n)), "n": n, "per_class": per_class,
            "confusion": confusion.tolist(), "mean_confidence": float(confidence[known].mean()) if n else 0.0,
            "class_names": list(names)}


def loader_batches(loader, device: str):
    """(x, y) batches of every example of an Examples loader, in file order."""
    for _, (x, y, _) in loader.iter_batches(device):
        yield x, y


def accuracy_eval(val_loader, meta: dict, run):
    """A train.py extra_eval: val accuracy (and mean confidence) over the whole val split."""
    def extra_eval(model) -> dict:
        out = evaluate(model, loader_batches(val_loader, run.device), meta, run.autocast)
        known = out["label"] >= 0
        correct = (out["pred"] == out["label"])[known].sum()
        total = max(1, known.sum())
        if run.ddp:  # every rank evaluated its share of the examples
            import torch.distributed as dist
            t = torch.tensor([float(correct), float(total)], device=run.device)
            dist.all_reduce(t)
            correct, total = t.tolist()
        return {"val_acc": float(correct) / float(total)}
    return extra_eval
