"""
Questions whose answers can be checked, and the checks: what rl.py trains on and
prepare/pairs.py mines preference pairs from.

A question file is JSONL, one {"prompt", "reference"[, "group"]} object a line (prepare/arith.py
writes them; "group" is a language or a kind of question, for per-group figures). A reward is
a callable (prompt, reply, reference) -> float, 1.0 meaning right: "exact" (the reply equals the
reference, stripped), "number" (its last number is the reference's), or "module:function", the
user's own, imported from the current folder or PYTHONPATH.
"""
import importlib
import json
import os
import re
import sys

from data import read_utf8
from settings import ConfigError


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


BUILTIN_REWARDS = {
    "exact": lambda prompt, reply, reference: float(reply.strip() == reference.strip()),
    "number": lambda prompt, reply, reference: float(last_number(reply) is not None
                                                     and last_number(reply) == last_number(reference)),
}


def load_reward(name: str):
    """The reward callable `reward` names: a builtin, or module:function importable from here."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module, _, function = name.partition(":")
    if os.getcwd() not in sys.path:  # a reward module in the folder the command runs in
        sys.path.append(os.getcwd())
    if not module or not function:
        raise ConfigError(f"reward = {name!r} is neither {' nor '.join(BUILTIN_REWARDS)} nor module:function "
                          "(a Python callable (prompt, reply, reference) -> float)", "reward")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward = {name!r} cannot be loaded ({type(e).__name__}: {e}); give module:function "
                          "in the current folder or on PYTHONPATH", "reward") from None
    if not callable(fn):
        raise ConfigError(f"reward = {name!r} is not callable; name a function (prompt, reply, reference) -> float",
                          "reward")
    return fn


def read_questions(path: str, key: str) -> list[dict]:
    """The {"prompt", "reference"[, "group"]} lines of a JSONL file; a bad line names file:line."""
    questions = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            questions.append({"prompt": str(r["prompt"]), "reference": str(r["reference"]),
                              "group": str(r.get("group", ""))})
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{n} (from {key}): expected a JSON object with \"prompt\" and \"reference\"",
                              key) from None
    if not questions:
        raise ConfigError(f"{path} (from {key}) holds no questions", key)
    return questions
