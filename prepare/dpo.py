"""
Preference records -> a DPO dataset: for each prompt a chosen and a rejected reply, as two
adjacent examples that share a pretrain dataset's tokenizer (+ the chat tokens), like SFT data.

    python prepare/dpo.py --input prefs.json --name NAME --base data/<pretrain-name>
        [--max_length 1024] [--val_fraction 0.05] [--skip_bad] [--seed 1337]

The records are prepare/sft.py's preference records (LLaMA-Factory's conversations + chosen +
rejected, minimind's DPO files, ...), parsed by its to_messages: once with the chosen reply, once
with the rejected one in its place; the two must share their prompt turns.
Layout of data/<name>/ (prepare/sft.py's, read by dpo.py's Pairs): example 2i is pair i's
prompt + chosen reply, example 2i+1 the same prompt + rejected reply, rendered with the chat
template. The mask marks the reply's content and its end-of-turn token only: assistant turns
earlier in the prompt are context here, as in TRL, not targets as in SFT.
Rules (counted in the summary):
  - a prompt too long for --max_length is cut at turn boundaries (tokenizer.fit_conversation) by
    the cut the longer reply needs, the same for both halves; a pair that cannot fit is dropped.
  - a record without both replies, or whose two conversations differ before the reply, is
    malformed (an error, or skipped and counted with --skip_bad); unknown roles and (char bases)
    turns with no character in the table skip the record, as in prepare/sft.py.
  - val: --val_fraction of the records read, by prepare/sft.py's seeded shuffle; a pair is never
    split. meta.json says task "dpo".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import array  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import data  # noqa: E402
import tokenizer  # noqa: E402
from prepare.sft import (RecordError, UnknownRoleError, convert_records, split_records, to_messages,  # noqa: E402
                         unencodable)
from settings import cli  # noqa: E402
from tokenizer import CHAT_TOKENS, fit_conversation, render_conversation  # noqa: E402


def pair_messages(record, notes: Counter) -> tuple[list[dict], dict, dict]:
    """(prompt turns, chosen reply, rejected reply) of a preference record in the template's roles."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"not a preference record: expected 'chosen' and 'rejected' replies ({keys})")
    rest = {k: v for k, v in record.items() if k != "rejected"}
    chosen = to_messages(rest, notes)
    rejected = to_messages({**rest, "chosen": record["rejected"]}, Counter())  # the prompt counted once
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("the chosen and rejected conversations differ before their last turn")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("the chosen and rejected conversations must end with the assistant's reply")
    return chosen[:-1], chosen[-1], rejected[-1]


def encode_pair(tok, record, max_length: int, counts: Counter) -> list[tuple[list[int], list[int]]] | None:
    """[(ids, mask) of prompt + chosen, (ids, mask) of prompt + rejected], or None when the
    record is skipped (the reason is counted)."""
    notes = Counter()
    try:
        prompt, chosen, rejected = pair_messages(record, notes)
    except UnknownRoleError as e:
        counts["unknown_role:" + str(e.role)] += 1
        return None
    longer = max(chosen, rejected, key=lambda m: len(tok.encode(m["content"])))
    fitted = fit_conversation(tok, prompt + [longer], max_length)
    if fitted is None:
        counts["too_long"] += 1
        return None
    kept = fitted[0][:-1]  # the prompt turns that fit beside the longer reply, so beside either
    if any(unencodable(tok, m["content"]) for m in kept + [chosen, rejected]):
        counts["unencodable"] += 1
        return None
    counts.update(notes)
    counts["truncated"] += len(kept) < len(prompt)
    n = len(render_conversation(tok, kept)[0])  # the template renders turn by turn: a shared prefix
    pair = []
    for reply in (chosen, rejected):
        ids, mask = render_conversation(tok, kept + [reply])
        pair.append((ids, [0] * n + mask[n:]))  # the reply alone is the target
    return pair


def build_dpo_dataset(inputs, base_dir, out_dir, max_length=1024, val_fraction=0.05, skip_bad=False,
                      seed=1337) -> dict:
    """Preference record files -> a DPO dataset in out_dir; returns the summary (also saved in
    meta.json under "source")."""
    t0 = time.time()
    if not max_length > 0 or not 0 < val_fraction < 1:
        raise ValueError(f"need max_length > 0 and 0 < val_fraction < 1, got {max_length}, {val_fraction}")
    base_dir = data.dataset_dir(base_dir)
    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise ValueError(f"the DPO dataset would overwrite its base {base_dir}; pick another --name")
    tok = tokenizer.from_meta(tokenizer.load_meta(base_dir))
    added = tok.add_special_tokens(CHAT_TOKENS)
    counts, bad, record_ids = Counter(), [], array.array("q")
    with data.building(out_dir) as build_dir:  # a failure leaves an earlier out_dir as it was
        writer = data.ExampleWriter(build_dir, "_all", tok.vocab_size, with_mask=True)
        convert_records(inputs, tok, writer, max_length, skip_bad, counts, bad, record_ids, encode=encode_pair)
        writer.close()
        if not counts["kept"]:
            raise ValueError(f"no preference pair was kept out of {counts['read']} records read ({dict(counts)})")
        all_prefix = os.path.join(build_dir, "_all")
        splits = split_records(all_prefix, build_dir, tok.vocab_size, val_fraction, seed, record_ids, counts["read"])
        for suffix in (".bin", ".idx", ".mask.bin"):
            os.remove(all_prefix + suffix)
        for s in splits.values():
            s["pairs"] = s["examples"] // 2
        summary = {"records_read": counts["read"], "kept": counts["kept"],
                   "skipped": {"malformed": counts["malformed"], "too_long": counts["too_long"],
                               "unknown_role": sum(v for k, v in counts.items() if k.startswith("unknown_role:")),
                               "unencodable": counts["unencodable"]},
                   "malformed_examples": bad, "truncated": counts["truncated"], "splits": splits,
                   "inputs": list(inputs), "val_fraction": val_fraction, "seed": seed, "max_length": max_length,
                   "chat_tokens_added": added, "vocab_size": tok.vocab_size, "seconds": round(time.time() - t0, 2)}
        tokenizer.save_meta(build_dir, tok.to_meta(task="dpo", base=base_dir, source=summary))
    return summary


def format_summary(s: dict, out_dir: str) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items() if v) or "none"
    lines = [f"{out_dir}: {s['records_read']:,} records read, {s['kept']:,} pairs kept, skipped: {skipped}, "
             f"prompts cut {s['truncated']:,}"]
    lines += [f"  malformed: {m}" for m in s["malformed_examples"]]
    lines += [f"  {split:5s} {n['pairs']:,} pairs, {n['tokens']:,} tokens, {n['targets']:,} target tokens"
              for split, n in s["splits"].items()]
    lines.append(f"  vocab_size {s['vocab_size']} (chat tokens added: {s['chat_tokens_added'] or 'none'}), "
                 f"{s['seconds']} s")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or JSON array files of preference records")
    parser.add_argument("--name", required=True, help="output folder: data/<name>")
    parser.add_argument("--base", required=True, help="pretrain dataset whose tokenizer to use")
    parser.add_argument("--max_length", type=int, default=1024, help="tokens per prompt + reply")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--skip_bad", action="store_true", help="skip malformed records")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    out_dir = os.path.join("data", args.name)
    summary = build_dpo_dataset(args.input, args.base, out_dir, args.max_length, args.val_fraction,
                                args.skip_bad, args.seed)
    print(format_summary(summary, out_dir))


if __name__ == "__main__":
    cli(main)  # RecordError, DataError, missing files: one line, no traceback
