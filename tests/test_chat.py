"""sample.py --chat: driven through piped stdin with the tiny SFT model of test_sft.py (one reply
line per user turn, generation stopping at end-of-turn, /reset, /help, /exit), and the trimming
of a long history to the context."""
import io
import os
import re
import subprocess
import sys

import tokenizer
from conftest import ROOT
from engine import fit_history
from sample import OneLine
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
    # reply, help, an empty line for the empty one (lines stay aligned), cleared, reply; nothing after /exit
    assert len(lines) == 5, lines
    assert lines[0] == GREETING_REPLY
    assert lines[1].startswith("/reset") and lines[2] == "" and lines[3] == "(conversation cleared)"
    assert re.fullmatch(r"\d\+\d=\d+\.", lines[4]), lines[4]  # a sum, then <|end|> (the digits may be wrong)


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


def test_fit_history_keeps_the_system_turn_and_drops_whole_exchanges(capsys):
    tok = tokenizer.CharTokenizer(list("abcdefghij "))
    tok.add_special_tokens(tokenizer.CHAT_TOKENS)
    system = [{"role": "system", "content": "be"}]
    turns = [{"role": r, "content": c} for r, c in
             [("user", "aaaa"), ("assistant", "bbbb"), ("user", "cccc"), ("assistant", "dddd"),
              ("user", "eeee")]]

    def rendered(messages):
        return tokenizer.render_conversation(tok, messages, add_generation_prompt=True)[0]

    full = rendered(system + turns)
    kept, ids = fit_history(tok, system, turns, budget=len(full))
    assert kept == turns and ids == full  # it fits: nothing dropped
    budget = len(rendered(system + turns[2:]))
    kept, ids = fit_history(tok, system, turns, budget)
    assert kept == turns[2:] and ids == rendered(system + kept)  # the oldest exchange went
    # one token short of the last two exchanges: the history never starts with an assistant
    # turn (as prepare/sft.py cuts training data), so only the newest user turn is left
    kept, ids = fit_history(tok, system, turns, budget - 1)
    assert kept == turns[4:] and ids == rendered(system + turns[4:])
    kept, ids = fit_history(tok, [], turns, len(rendered(turns[2:])))  # no system turn
    assert kept == turns[2:]
    # the newest turn fits only without the system turn: left out, said on stderr
    kept, ids = fit_history(tok, system, turns, len(rendered(turns[4:])))
    assert kept == turns[4:] and ids == rendered(turns[4:])
    assert "system prompt does not fit" in capsys.readouterr().err
    # even the newest user turn alone does not fit: it keeps its last tokens, ending in
    # <|end|> <|assistant|> and starting with <|user|>
    kept, ids = fit_history(tok, system, turns, 5)
    assert ids == [tok.token_id("<|user|>")] + rendered(turns[4:])[-4:] and kept == turns[4:]
    assert "the model reads its last 2" in capsys.readouterr().err


def test_piped_replies_are_one_line_each():
    buf = io.StringIO()
    out = OneLine(buf)
    for piece in ["two\nlines", " and a \\", "\n"]:
        out.write(piece)
    assert buf.getvalue() == "two\\nlines and a \\\\\\n" and "\n" not in buf.getvalue()
    assert buf.getvalue().encode().decode("unicode_escape") == "two\nlines and a \\\n"
