"""sample.py --chat: driven through piped stdin with the tiny SFT model of test_sft.py (one reply
line per user turn, generation stopping at end-of-turn, /reset, /help, /exit), and the trimming
of a long history to the context."""
import os
import re
import subprocess
import sys

import tokenizer
from conftest import ROOT
from sample import fit_history
from test_sft import GREETING_REPLY, tiny  # noqa: F401  (tiny is a fixture)

MAX_NEW = 300  # far more than any trained reply: a reply that ends early ended at <|end|>


def run_chat(out_dir: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out_dir}",
                           "--chat", "--temperature=0", f"--max_new_tokens={MAX_NEW}", "--device=cpu",
                           *args], input=stdin, capture_output=True, text=True, timeout=120, env=env)


def test_chat_through_piped_stdin(tiny):
    out_dir = os.path.join(tiny, "weight", "sft_char_tiny")
    result = run_chat(out_dir, "hello\n/help\n\n/reset\nadd 2 3\n/exit\nhi\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # reply, help, (the empty line is skipped), cleared, reply; nothing after /exit
    assert len(lines) == 4, lines
    assert lines[0] == GREETING_REPLY
    assert lines[1].startswith("/reset") and lines[2] == "(conversation cleared)"
    assert re.fullmatch(r"\d\+\d=\d+\.", lines[3]), lines[3]  # a sum, then <|end|> (the digits may be wrong)


def test_chat_multi_turn_with_a_system_prompt_ends_at_end_of_input(tiny):
    out_dir = os.path.join(tiny, "weight", "sft_char_tiny")
    result = run_chat(out_dir, "hey\nadd 1 1\nadd 4 4\n", "--system=be brief.")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines  # one line per user turn, each cut at <|end|>
    assert lines[0] == GREETING_REPLY
    assert all(0 < len(line) < MAX_NEW for line in lines)


def test_chat_refuses_a_model_without_chat_tokens(tiny):
    result = run_chat(os.path.join(tiny, "weight", "char_tiny"), "hello\n")
    assert result.returncode == 1 and "not a chat model" in result.stderr


def test_fit_history_keeps_the_system_turn_and_drops_the_oldest():
    tok = tokenizer.CharTokenizer(list("abcdefghij "))
    tok.add_special_tokens(tokenizer.CHAT_TOKENS)
    system = {"role": "system", "content": "be"}
    turns = [{"role": r, "content": c} for r, c in
             [("user", "aaaa"), ("assistant", "bbbb"), ("user", "cccc"), ("assistant", "dddd"),
              ("user", "eeee")]]

    def rendered(messages):
        return tokenizer.render_conversation(tok, messages, add_generation_prompt=True)[0]

    full = rendered([system] + turns)
    kept, ids = fit_history(tok, [system] + turns, budget=len(full))
    assert kept == [system] + turns and ids == full  # it fits: nothing dropped
    budget = len(rendered([system] + turns[2:]))
    kept, ids = fit_history(tok, [system] + turns, budget)
    assert kept == [system] + turns[2:] and ids == rendered(kept)  # the oldest exchange went
    kept, ids = fit_history(tok, [system] + turns, budget - 1)
    assert kept[0] == system and kept[-1] == turns[-1] and len(ids) <= budget - 1
    kept, ids = fit_history(tok, turns, len(rendered(turns[1:])))  # no system turn
    assert kept == turns[1:]
    # even the last user turn alone does not fit: keep the newest tokens, ending in <|assistant|>
    kept, ids = fit_history(tok, [system] + turns, 5)
    assert len(ids) == 5 and ids[-1] == tok.token_id("<|assistant|>")
