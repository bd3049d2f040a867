"""
Chat records -> an SFT dataset that shares a pretrain dataset's tokenizer (+ the chat tokens).

    python prepare/sft.py --input chats.jsonl --name my_sft --base data/<pretrain-name>
        [--max_length 1024] [--val_fraction 0.05 | --val_input FILE ...] [--skip_bad] [--seed 1337]

Input files are JSONL or one JSON array, UTF-8. A file is a JSON array when it starts with "["
and its first line is not a whole JSON value with more lines after it (that is JSONL whose first
record is a list, an error at line 1).
The format is detected per record:
  {"conversations": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}   minimind
  {"messages": [{"role": ..., "content": str | [{"type": "text", "text": ...}]}]}    OpenAI
  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}          ShareGPT
  {"instruction", "input", "output", ["system"], ["history": [[user, assistant]]]}  Alpaca
  preference records (LLaMA-Factory, minimind DPO files): any of the above with "chosen" and
  "rejected" replies, each one turn ({"from": "gpt", "value": ...} or {"role", "content"}), a
  string, or (minimind) a whole conversation; the chosen reply is the assistant turn SFT trains
  on. The rejected reply is skipped and counted (summary: rejected_skipped), not kept: SFT does
  not use it, and a preference step would read the source file.
Rules (everything is counted and reported in the summary, nothing is silent):
  - text:  a string stays as is; a list of text parts (strings or {"type": "text", "text"|"value":
           str}) is joined with "\n". Anything else is flattened and counted: text parts give their
           text, list items are joined with "\n", other values are json.dumps(ensure_ascii=False).
  - roles: human/gpt/bot/chatgpt/model/developer are aliases of the template's roles;
           function_call, observation, function, ipython are mapped to the tool role (counted);
           any other role skips the record (counted by role).
  - a malformed record (bad JSON, no known format, missing content) is an error naming the file
    and line (JSONL) or index (JSON array); --skip_bad skips and counts it instead.
  - conversations longer than --max_length tokens are cut at turn boundaries: the leading system
    turn(s) stay, the oldest exchanges (a user turn and what follows it) go. If even the latest
    exchange does not fit, the record is dropped. A conversation without a target is dropped.
  - with a char base, characters missing from its table cannot be encoded: they are dropped and
    counted. A turn with text of which no visible character is in the table would become an
    empty turn: its record is skipped (counted as unencodable), as records with unknown roles
    are, since the record is well-formed and --skip_bad is for malformed ones.
    Keep --max_length <= the SFT block_size + 1 so the loader never cuts an example.
  - val: --val_fraction of the records read, by a seeded shuffle, whichever of them are kept
    (so another --max_length never moves a record between splits); or the --val_input files.
Writes data/<name>/{train,val}.{bin,idx,mask.bin} and meta.json (the base tokenizer + chat tokens).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import array
import json
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

import data
import tokenizer
from settings import cli
from data import decode_utf8, open_input
from tokenizer import CHAT_TOKENS, fit_conversation

# Other names datasets use for the template's roles.
ROLE_NAMES = {"system": "system", "developer": "system",
              "user": "user", "human": "user",
              "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
              "chatgpt": "assistant", "model": "assistant",
              "tool": "tool"}
# Roles the template has no token for; their turns become tool turns (never training targets).
TOOL_ROLES = ("function_call", "observation", "function", "ipython")


class RecordError(ValueError):
    """A malformed record: bad JSON, no recognizable format, a missing field."""


class UnknownRoleError(ValueError):
    """A role that is neither a template role, an alias, nor a tool-like role."""

    def __init__(self, role):
        super().__init__(f"unknown role {role!r}")
        self.role = role


# ----------------------------------------------------------------------------- reading

def _is_json_array(path: str) -> bool:
    """True for one JSON array, False for JSONL (rule in the module docstring). Only the first
    lines are read: a JSONL file may be far larger than memory."""
    with open_input(path) as f:
        first = next((line for line in f if line.strip()), b"")
        first = first.strip().removeprefix(b"\xef\xbb\xbf").lstrip()  # UTF-8 BOM
        if not first.startswith(b"["):
            return False
        try:
            json.loads(first)
        except ValueError:  # not whole on one line: an array written over many lines
            return True
        return not any(line.strip() for line in f)  # more lines after it: JSONL


def iter_records(path: str, on_bad=None):
    """Yield (location, record) for each record of a JSONL file or a JSON array file.

    A JSONL line that is not valid JSON raises RecordError naming the file and line, unless
    on_bad is given: then on_bad(location, message) is called and reading goes on."""
    if _is_json_array(path):
        # A JSON array has to be parsed whole; records are still handed out one at a time.
        with open_input(path) as f:
            text = decode_utf8(f.read(), path).removeprefix("\ufeff")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column "
                              f"{e.colno}); a JSON array file must be one array") from None
        for i, record in enumerate(records):
            yield f"{path} index {i}", record
        return
    with open_input(path) as f:  # bytes, so that bad UTF-8 is reported with its line number
        for lineno, raw in enumerate(f, 1):
            location = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff").strip()
                if not line:
                    continue
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                message = f"not a valid UTF-8 JSON line ({e})"
                if on_bad is None:
                    raise RecordError(f"{location}: {message}") from None
                on_bad(location, message)
                continue
            yield location, record


# ----------------------------------------------------------------------------- records -> messages

def _part_text(part):
    """The text of a text part (a string, or a dict with a string "text"/"value" and type text)."""
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type", "text") == "text":
        text = part.get("text", part.get("value"))
        if isinstance(text, str):
            return text
    return None


def _flatten(value) -> str:
    if isinstance(value, list):
        return "\n".join(_flatten(v) for v in value)
    text = _part_text(value)
    return text if text is not None else json.dumps(value, ensure_ascii=False)


def flatten_text(value, notes: Counter | None = None) -> str:
    """Text from a value found where text is expected (rules in the module docstring). Values
    that are neither a string nor a list of text parts count in notes["flattened"]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(_part_text(p) is not None for p in value):
        return "\n".join(_part_text(p) for p in value)  # OpenAI content parts: nothing is lost
    if notes is not None:
        notes["flattened"] += 1
    return _flatten(value)


def _text(value, what: str, notes: Counter) -> str:
    if value is None:
        raise RecordError(f"{what} is missing")
    return flatten_text(value, notes)


def _role(name, notes: Counter) -> str:
    if not isinstance(name, str):
        raise RecordError(f"role {name!r} is not a string")
    key = name.strip().lower()
    if key in ROLE_NAMES:
        return ROLE_NAMES[key]
    if key in TOOL_ROLES:
        notes["mapped:" + key] += 1
        return "tool"
    raise UnknownRoleError(name)


def _message(m, where: str, notes: Counter) -> dict:
    """One {"role", "content"} (OpenAI / minimind) or {"from", "value"} (ShareGPT) turn."""
    if not isinstance(m, dict):
        raise RecordError(f"{where} is a {type(m).__name__}, not an object")
    if "role" not in m and "from" not in m:
        raise RecordError(f"{where} has neither 'role' nor 'from' (keys: {sorted(m)})")
    role = _role(m["role"] if "role" in m else m["from"], notes)
    content = m.get("content", m.get("value"))
    calls = m.get("tool_calls") or m.get("function_call")
    if content is None and calls:
        # An OpenAI assistant turn that only calls tools: the call itself is the content.
        notes["flattened"] += 1
        return {"role": role, "content": _flatten(calls)}
    return {"role": role, "content": _text(content, f"{where} ({role}) content", notes)}


def _alpaca(record: dict, notes: Counter) -> list[dict]:
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "system", notes)})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"'history' is a {type(history).__name__}, not a list of pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(f"history[{i}] is not a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]", notes)})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]", notes)})
    instruction = _text(record["instruction"], "'instruction'", notes)
    extra = flatten_text(record["input"], notes) if record.get("input") is not None else ""
    user = "\n\n".join(t for t in (instruction, extra) if t)
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(record["output"], "'output'", notes)})
    return messages


def _preference(record: dict, notes: Counter) -> list[dict]:
    """The prompt turns of a preference record, then its chosen reply as the assistant turn."""
    chosen = record["chosen"]
    if "rejected" in record:
        notes["rejected"] += 1
    if isinstance(chosen, list):  # minimind: chosen and rejected are whole conversations
        return [_message(m, f"chosen[{i}]", notes) for i, m in enumerate(chosen)]
    if isinstance(chosen, dict):
        reply = _message(chosen, "'chosen'", notes)
    elif isinstance(chosen, str):
        reply = {"role": "assistant", "content": chosen}
    else:
        raise RecordError(f"'chosen' is a {type(chosen).__name__}; expected a turn, a string or a list of turns")
    if reply["role"] != "assistant":
        raise RecordError(f"'chosen' is a {reply['role']} turn; it must be the assistant's reply")
    prompt = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    if "instruction" in prompt and "output" not in prompt:  # Alpaca-style preference record
        return _alpaca({**prompt, "output": reply["content"]}, notes)
    return to_messages(prompt, notes) + [reply]


def to_messages(record, notes: Counter | None = None) -> list[dict]:
    """[{"role", "content"}, ...] in the template's roles for one record of any known format.
    Raises RecordError (a ValueError) on a malformed record and UnknownRoleError (also a
    ValueError) on a role it cannot map. notes counts flattened values and mapped roles."""
    notes = Counter() if notes is None else notes
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got a {type(record).__name__}")
    if "chosen" in record:
        return _preference(record, notes)
    for key in ("messages", "conversations"):
        if key in record:
            turns = record[key]
            if not isinstance(turns, list):
                raise RecordError(f"'{key}' is a {type(turns).__name__}, not a list")
            messages = [_message(m, f"{key}[{i}]", notes) for i, m in enumerate(turns)]
            # ShareGPT files often keep the system prompt beside the turns.
            if record.get("system") and not (messages and messages[0]["role"] == "system"):
                messages.insert(0, {"role": "system", "content": _text(record["system"], "system", notes)})
            return messages
    if "instruction" in record and "output" in record:
        return _alpaca(record, notes)
    raise RecordError("no recognizable format: expected 'conversations', 'messages', "
                      f"'instruction' + 'output' or a 'chosen' reply (keys: {sorted(record)[:10]})")


# ----------------------------------------------------------------------------- messages -> tokens

def _encode(tok, record, max_length: int, counts: Counter):
    """(ids, mask) for one record, or None when it is skipped (the reason is counted).
    Flattened values and mapped roles are counted only for records that are kept."""
    notes = Counter()
    try:
        messages = to_messages(record, notes)
    except UnknownRoleError as e:
        counts["unknown_role:" + str(e.role)] += 1
        return None
    if not any(m["role"] == "assistant" for m in messages):
        counts["no_target"] += 1
        return None
    try:
        fitted = fit_conversation(tok, messages, max_length)
    except KeyError as e:  # a vocab tokenizer without an unk token meets an unknown word
        raise RecordError(f"cannot be encoded with the base tokenizer: {e}") from None
    if fitted is None:
        counts["too_long"] += 1
        return None
    kept, ids, mask = fitted
    if not any(mask):  # the cut left no assistant turn
        counts["no_target"] += 1
        return None
    if any(unencodable(tok, m["content"]) for m in kept):
        counts["unencodable"] += 1
        return None
    counts.update(notes)
    counts["truncated"] += len(kept) < len(messages)
    if isinstance(tok, tokenizer.CharTokenizer):
        for m in kept:
            if tok.count_unknown(m["content"]):
                counts.update("char:" + c for c in m["content"] if c not in tok.stoi)
    return ids, mask


def unencodable(tok, text: str) -> bool:
    """True when text has visible characters and a char table knows none of them: the turn
    would train on an empty (or blank) text that stands for something else. Other tokenizers
    encode any text (tiktoken) or map unknown words to an unk token (vocab)."""
    if not isinstance(tok, tokenizer.CharTokenizer):
        return False
    visible = [c for c in text if not c.isspace()]
    return bool(visible) and not any(c in tok.stoi for c in visible)


def sft_examples(tok, record, max_length: int, counts: Counter) -> list | None:
    """[(ids, mask)]: a record's one training example, or None when it is skipped (counted)."""
    encoded = _encode(tok, record, max_length, counts)
    return None if encoded is None else [encoded]


def convert_records(paths, tok, writer, max_length: int, skip_bad: bool, counts: Counter, bad: list,
                    record_ids=None, encode=sft_examples) -> None:
    """Stream every record of paths into writer as encode(tok, record, max_length, counts)'s
    examples (SFT: one; prepare/dpo.py: a chosen and a rejected one), counting what happens to
    each record. record_ids, when given, gets the record's number (in reading order, from 0)
    once per example, so a split keeps a record's examples together."""
    def skip(location, message):
        counts["malformed"] += 1
        if len(bad) < 5:  # a few examples for the report, not a copy of every bad line
            bad.append(f"{location}: {message}")

    def skip_unreadable(location, message):  # a line that never became a record
        counts["read"] += 1
        skip(location, message)

    for path in paths:
        records = iter_records(path, skip_unreadable if skip_bad else None)
        for location, record in tqdm(records, desc=os.path.basename(path), unit=" rec",
                                     disable=None, leave=False):
            counts["read"] += 1
            try:
                examples = encode(tok, record, max_length, counts)
            except RecordError as e:
                if not skip_bad:
                    raise RecordError(f"{location}: {e} (pass --skip_bad to skip such records)") from None
                skip(location, str(e))
                continue
            if examples is not None:
                for ids, mask in examples:
                    writer.add(ids, mask)
                    if record_ids is not None:
                        record_ids.append(counts["read"] - 1)
                counts["kept"] += 1


# ----------------------------------------------------------------------------- dataset

def split_records(all_prefix: str, out_dir: str, vocab_size: int, val_fraction: float, seed: int,
           record_ids, n_read: int):
    """Copy the examples of <all_prefix>.* into train and val. Val is drawn among all records
    read (a seeded shuffle), not among those kept: preparing again with another --max_length
    only drops examples from each split, never moves one across, so a run trained on one
    version's train split has not seen another version's val split."""
    starts = np.fromfile(all_prefix + ".idx", dtype=np.uint64).astype(np.int64)
    tokens = np.memmap(all_prefix + ".bin", dtype=np.uint16, mode="r")
    masks = np.memmap(all_prefix + ".mask.bin", dtype=np.uint8, mode="r")
    ends = np.append(starts[1:], len(tokens))
    n = len(starts)
    rank = np.random.default_rng(seed).permutation(n_read)[np.asarray(record_ids, dtype=np.int64)]  # (n,)
    is_val = rank < max(1, round(n_read * val_fraction))
    # Keep both splits non-empty when there are 2 records. A record's examples share its rank
    # and move together (prepare/dpo.py writes two per record: a pair is never split).
    if n >= 2 and not is_val.any():
        is_val = rank == rank.min()
    if n >= 2 and is_val.all():
        is_val = rank != rank.max()
    writers = {split: data.ExampleWriter(out_dir, split, vocab_size, with_mask=True)
               for split in ("train", "val")}
    for i in range(n):  # file order is kept within each split; the loader shuffles
        writers["val" if is_val[i] else "train"].add(tokens[starts[i]:ends[i]], masks[starts[i]:ends[i]])
    del tokens, masks
    return {split: w.close() for split, w in writers.items()}


def _prefixed(counts: Counter, prefix: str) -> dict:
    return dict(sorted((k[len(prefix):], v) for k, v in counts.items() if k.startswith(prefix)))


def _summary(counts: Counter, bad: list, splits: dict) -> dict:
    unknown_roles, dropped_chars = _prefixed(counts, "unknown_role:"), _prefixed(counts, "char:")
    summary = {
        "records_read": counts["read"], "kept": counts["kept"],
        "skipped": {"malformed": counts["malformed"], "unknown_role": sum(unknown_roles.values()),
                    "too_long": counts["too_long"], "no_target": counts["no_target"],
                    "unencodable": counts["unencodable"]},
        "unknown_roles": unknown_roles, "malformed_examples": bad,
        "flattened_values": counts["flattened"], "mapped_roles": _prefixed(counts, "mapped:"),
        "truncated": counts["truncated"], "rejected_skipped": counts["rejected"],
        "dropped_characters": sum(dropped_chars.values()),
        "dropped_characters_top": "".join(sorted(dropped_chars, key=dropped_chars.get,
                                                  reverse=True)[:20]),
        "splits": splits,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "targets": sum(s["targets"] for s in splits.values()),
    }
    summary["warnings"] = [f"the {split} split is empty" for split, s in splits.items()
                           if s["examples"] == 0]
    return summary


def build_sft_dataset(inputs, base_dir, out_dir, max_length=1024, val_fraction=0.05,
                      skip_bad=False, seed=1337, val_inputs=None) -> dict:
    """Turn chat record files into an SFT dataset in out_dir; return the summary dict (it is
    also saved in meta.json under "source"). val_inputs, when given, replace val_fraction."""
    t0 = time.time()
    if not max_length > 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not val_inputs and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    base_dir = data.dataset_dir(base_dir)
    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise ValueError(f"the SFT dataset would overwrite its base {base_dir}; pick another --name")
    tok = tokenizer.from_meta(tokenizer.load_meta(base_dir))
    added = tok.add_special_tokens(CHAT_TOKENS)
    counts, bad = Counter(), []
    options = (max_length, skip_bad, counts, bad)
    with data.building(out_dir) as build_dir:  # a failure leaves an earlier out_dir as it was
        splits = _write_splits(inputs, val_inputs, tok, build_dir, val_fraction, seed, options)
        if not counts["kept"]:
            reasons = {k: v for k, v in counts.items() if not k.startswith("char:")}
            raise ValueError(f"no conversation was kept out of {counts['read']} records read "
                             f"({reasons})")
        summary = _summary(counts, bad, splits)
        summary.update({"inputs": list(inputs), "val_inputs": list(val_inputs or []),
                        "val_fraction": None if val_inputs else val_fraction, "seed": seed,
                        "max_length": max_length, "chat_tokens_added": added,
                        "vocab_size": tok.vocab_size, "seconds": round(time.time() - t0, 2)})
        tokenizer.save_meta(build_dir, tok.to_meta(task="sft", base=base_dir, source=summary))
    return summary


def _write_splits(inputs, val_inputs, tok, out_dir, val_fraction, seed, options) -> dict:
    """Every record of inputs (and val_inputs) into out_dir's train and val splits; returns
    {split: writer summary}, or {} when no record was kept."""
    if val_inputs:
        writers = {s: data.ExampleWriter(out_dir, s, tok.vocab_size, with_mask=True)
                   for s in ("train", "val")}
        convert_records(inputs, tok, writers["train"], *options)
        convert_records(val_inputs, tok, writers["val"], *options)
        return {s: w.close() for s, w in writers.items()}
    # Val is a seeded random subset, so examples go to a temporary split first (on disk, not
    # in memory) and are copied out once their number is known.
    all_writer = data.ExampleWriter(out_dir, "_all", tok.vocab_size, with_mask=True)
    record_ids = array.array("q")
    counts = options[2]  # options: (max_length, skip_bad, counts, bad), as _convert takes them
    convert_records(inputs, tok, all_writer, *options, record_ids=record_ids)
    all_writer.close()
    all_prefix = os.path.join(out_dir, "_all")
    splits = {}
    if counts["kept"]:
        splits = split_records(all_prefix, out_dir, tok.vocab_size, val_fraction, seed, record_ids,
                        counts["read"])
    for suffix in (".bin", ".idx", ".mask.bin"):
        os.remove(all_prefix + suffix)
    return splits


def format_summary(s: dict, out_dir: str) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items() if v) or "none"
    lines = [
        f"{out_dir}: {s['records_read']:,} records read, {s['kept']:,} kept, skipped: {skipped}",
        f"  flattened values {s['flattened_values']:,}, mapped roles {s['mapped_roles'] or 'none'}, "
        f"truncated {s['truncated']:,}, dropped characters {s['dropped_characters']:,}",
    ]
    if s["rejected_skipped"]:
        lines.append(f"  preference records: the chosen reply is the target; {s['rejected_skipped']:,} "
                     "rejected replies skipped")
    if s["unknown_roles"]:
        lines.append(f"  unknown roles (records skipped): {s['unknown_roles']}")
    if s["dropped_characters"]:
        lines.append(f"  characters not in the base table, e.g.: {s['dropped_characters_top']!r}")
    lines += [f"  malformed: {m}" for m in s["malformed_examples"]]
    for split, n in s["splits"].items():
        lines.append(f"  {split:5s} {n['examples']:,} examples, {n['tokens']:,} tokens, "
                     f"{n['targets']:,} target tokens")
    lines.append(f"  vocab_size {s['vocab_size']} (chat tokens added: {s['chat_tokens_added'] or 'none'}),"
                 f" {s['seconds']} s")
    lines += [f"  warning: {w}" for w in s["warnings"]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or JSON array files")
    parser.add_argument("--name", required=True, help="output folder: data/<name>")
    parser.add_argument("--base", required=True, help="pretrain dataset whose tokenizer to use")
    parser.add_argument("--max_length", type=int, default=1024, help="tokens per conversation")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val_fraction", type=float, default=0.05)
    val.add_argument("--val_input", nargs="+", help="files for the val split instead")
    parser.add_argument("--skip_bad", action="store_true", help="skip malformed records")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    out_dir = os.path.join("data", args.name)
    summary = build_sft_dataset(args.input, args.base, out_dir, args.max_length,
                                args.val_fraction, args.skip_bad, args.seed, args.val_input)
    print(format_summary(summary, out_dir))


if __name__ == "__main__":
    cli(main)  # RecordError, DataError, missing files: one line, no traceback
