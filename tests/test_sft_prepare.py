"""prepare/sft.py: input formats, flattening, roles, malformed records, truncation, and the loss
mask at token level, read back through data.Examples."""
import json
import os
from collections import Counter

import numpy as np
import pytest

import data
import tokenizer
from conftest import shared_path
from prepare import sft as prepare_sft
from prepare.sft import RecordError, UnknownRoleError, build_sft_dataset, iter_records, to_messages

ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?+-=:'\"{}[]\n"
            "你好世界请问今天天气很不错谢谢")

# One conversation, as each input format writes it.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
FORMATS = {
    "minimind": {"conversations": CONVERSATION},
    "openai": {"messages": [CONVERSATION[0],
                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                            *CONVERSATION[2:]]},
    "sharegpt": {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in CONVERSATION]},
    "alpaca": {"system": "Be brief.", "history": [["Hi", "Hello!"]], "instruction": "2+2?",
               "input": "", "output": "4"},
}
VAL_RECORD = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


def make_base(path, tok) -> str:
    tokenizer.save_meta(str(path), tok.to_meta(source="test base"))
    return str(path)


@pytest.fixture
def char_base(tmp_path):
    return make_base(tmp_path / "base", tokenizer.CharTokenizer.from_text(ALPHABET))


def write_records(path, records, as_array=False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if as_array:
            json.dump(records, f, ensure_ascii=False, indent=1)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return str(path)


def build(tmp_path, base, records, as_array=False, **kwargs):
    """Build from records; val is one fixed extra record so train keeps every record in order
    (so the summary's records_read and kept include it: one more than the records given)."""
    os.makedirs(tmp_path, exist_ok=True)
    inputs = write_records(tmp_path / ("in.json" if as_array else "in.jsonl"), records, as_array)
    val = write_records(tmp_path / "val.jsonl", [VAL_RECORD])
    out = str(tmp_path / "sft")
    summary = build_sft_dataset([inputs], base, out, val_inputs=[val], **kwargs)
    return summary, out


def train_examples(out, split="train"):
    """The examples of a split (train by default) as (ids, mask) arrays, in file order."""
    tokens = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)
    masks = np.fromfile(os.path.join(out, f"{split}.mask.bin"), dtype=np.uint8)
    starts = np.fromfile(os.path.join(out, f"{split}.idx"), dtype=np.uint64).astype(np.int64)
    ends = np.append(starts[1:], len(tokens))
    return [(tokens[s:e], masks[s:e]) for s, e in zip(starts, ends)]


def rendered(messages) -> str:
    return "".join(tokenizer.ROLE_TOKENS[m["role"]] + m["content"] + tokenizer.END_OF_TURN
                   for m in messages)


def out_tokenizer(out):
    return tokenizer.from_meta(tokenizer.load_meta(out))


# ----------------------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_same_messages(fmt):
    assert to_messages(FORMATS[fmt]) == CONVERSATION


# The same conversation as a preference record: the chosen reply is the last assistant turn.
PREFERENCE = {
    "llamafactory": {"conversations": FORMATS["sharegpt"]["conversations"][:-1],
                     "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
    "minimind": {"chosen": CONVERSATION, "rejected": CONVERSATION[:-1] + [{"role": "assistant", "content": "5"}]},
    "string": {"messages": CONVERSATION[:-1], "chosen": "4", "rejected": "5"},
    "alpaca": {**{k: v for k, v in FORMATS["alpaca"].items() if k != "output"}, "chosen": "4", "rejected": "5"},
}


@pytest.mark.parametrize("fmt", PREFERENCE)
def test_preference_formats_take_the_chosen_reply_and_count_the_rejected(fmt):
    notes = Counter()
    assert to_messages(PREFERENCE[fmt], notes) == CONVERSATION
    assert notes["rejected"] == 1


def test_a_chosen_reply_that_is_not_the_assistants_is_an_error():
    record = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "human", "value": "x"}}
    with pytest.raises(RecordError, match="'chosen' is a user turn"):
        to_messages(record)
    with pytest.raises(RecordError, match="'chosen' is a int"):
        to_messages({"conversations": [], "chosen": 3})


def test_openai_content_parts_are_joined_and_not_counted():
    notes = Counter()
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "one"},
                                                        {"type": "text", "value": "two"}, "three"]},
                           {"role": "assistant", "content": []}]}
    assert to_messages(record, notes) == [{"role": "user", "content": "one\ntwo\nthree"},
                                          {"role": "assistant", "content": ""}]
    assert notes["flattened"] == 0


def test_alpaca_input_joins_instruction_and_empty_system_adds_no_turn():
    record = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": ""}
    assert to_messages(record) == [{"role": "user", "content": "Add\n\n2 and 2"},
                                   {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_builds_the_rendered_conversation(tmp_path, char_base, fmt):
    summary, out = build(tmp_path, char_base, [FORMATS[fmt]])
    tok = out_tokenizer(out)
    ids, mask = train_examples(out)[0]
    assert tok.decode(ids) == rendered(CONVERSATION)
    assert summary["records_read"] == summary["kept"] == 2


def test_json_array_and_jsonl_give_identical_bins(tmp_path, char_base):
    records = list(FORMATS.values())
    _, out_a = build(tmp_path / "a", char_base, records, as_array=True)
    _, out_b = build(tmp_path / "b", char_base, records, as_array=False)
    for name in ("train.bin", "train.idx", "train.mask.bin"):
        with open(os.path.join(out_a, name), "rb") as a, open(os.path.join(out_b, name), "rb") as b:
            assert a.read() == b.read(), name
    assert [loc for loc, _ in iter_records(str(tmp_path / "a" / "in.json"))][1].endswith("in.json index 1")
    assert [loc for loc, _ in iter_records(str(tmp_path / "b" / "in.jsonl"))][1].endswith("in.jsonl line 2")


# ----------------------------------------------------------------------------- non-ASCII text

CHINESE = [{"role": "user", "content": "你好，请问今天天气怎么样？"},
           {"role": "assistant", "content": "今天天气很不错。"}]


def test_chinese_round_trips_with_gpt2_base(tmp_path, gpt2_available):
    base = make_base(tmp_path / "base", tokenizer.TiktokenTokenizer("gpt2"))
    summary, out = build(tmp_path, base, [{"conversations": CHINESE}], as_array=True)
    ids, _ = train_examples(out)[0]
    assert out_tokenizer(out).decode(ids) == rendered(CHINESE)
    assert summary["dropped_characters"] == 0


def test_chinese_with_char_base_counts_characters_it_cannot_encode(tmp_path, char_base):
    # The base table has 你好请问今天天气很不错 but not ，怎么样？。
    summary, out = build(tmp_path, char_base, [{"conversations": CHINESE}])
    ids, _ = train_examples(out)[0]
    known = [{"role": m["role"], "content": "".join(c for c in m["content"] if c in ALPHABET)}
             for m in CHINESE]
    assert out_tokenizer(out).decode(ids) == rendered(known)
    assert summary["dropped_characters"] == 6
    assert set(summary["dropped_characters_top"]) == set("，怎么样？。")


# ----------------------------------------------------------------------------- rules, counted

def test_nested_values_are_flattened_and_counted(tmp_path, char_base):
    record = {"messages": [
        {"role": "user", "content": {"q": "hi", "n": 1}},
        {"role": "assistant", "content": [{"type": "text", "text": "see"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "user", "content": 42},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
    ]}
    summary, out = build(tmp_path, char_base, [record])
    assert [m["content"] for m in to_messages(record)] == [
        '{"q": "hi", "n": 1}', 'see\n{"type": "image_url", "image_url": {"url": "x"}}',
        "42", '{"name": "f"}']
    assert summary["flattened_values"] == 4
    assert summary["kept"] == 2


def test_tool_like_roles_map_to_tool_and_unknown_roles_skip(tmp_path, char_base):
    mapped = {"conversations": [{"from": "human", "value": "hi"},
                                {"from": "function_call", "value": "f()"},
                                {"from": "observation", "value": "1"},
                                {"role": "tool", "content": "2"},
                                {"from": "gpt", "value": "ok"}]}
    unknown = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert [m["role"] for m in to_messages(mapped)] == ["user", "tool", "tool", "tool", "assistant"]
    # The unknown-role record's function_call turn is not counted: that record is not kept.
    unknown["messages"].insert(0, {"role": "function_call", "content": "g()"})
    summary, out = build(tmp_path, char_base, [mapped, unknown])
    assert summary["mapped_roles"] == {"function_call": 1, "observation": 1}
    assert summary["skipped"]["unknown_role"] == 1 and summary["unknown_roles"] == {"narrator": 1}
    assert summary["kept"] == 2 and summary["records_read"] == 3
    with pytest.raises(UnknownRoleError, match="narrator"):
        to_messages(unknown)


MALFORMED_LINES = [
    json.dumps(FORMATS["minimind"]),
    '{"conversations": [{"role": "user", "content": "hi"}',      # line 2: bad JSON
    json.dumps({"prompt": "a", "completion": "b"}),              # line 3: unknown format
    json.dumps({"messages": [{"role": "user"}]}),                # line 4: missing content
    "",                                                          # blank lines are not records
    json.dumps(FORMATS["alpaca"]),
]


def test_malformed_line_is_an_error_naming_file_and_line(tmp_path, char_base):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(MALFORMED_LINES) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad\.jsonl line 2: not a valid UTF-8 JSON line"):
        build_sft_dataset([str(path)], char_base, str(tmp_path / "out"))
    no_content = write_records(tmp_path / "no_content.jsonl", [FORMATS["alpaca"], {"messages": [{"role": "user"}]}])
    with pytest.raises(RecordError, match=r"no_content\.jsonl line 2: messages\[0\] \(user\) content is missing"):
        build_sft_dataset([no_content], char_base, str(tmp_path / "out"))
    summary = build_sft_dataset([str(path)], char_base, str(tmp_path / "out"), skip_bad=True)
    assert summary["records_read"] == 5 and summary["kept"] == 2
    assert summary["skipped"]["malformed"] == 3
    assert [m.split(": ")[0][-6:] for m in summary["malformed_examples"]] == ["line 2", "line 3", "line 4"]


def test_malformed_array_record_names_its_index(tmp_path, char_base):
    path = write_records(tmp_path / "bad.json", [FORMATS["alpaca"], {"instruction": "x"}], as_array=True)
    with pytest.raises(RecordError, match=r"bad\.json index 1: no recognizable format"):
        build_sft_dataset([path], char_base, str(tmp_path / "out"))


def test_cli_reports_errors_and_prints_the_summary(tmp_path, char_base, monkeypatch, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(MALFORMED_LINES) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the CLI writes data/<name> under the working directory
    argv = ["--input", str(path), "--name", "chat", "--base", char_base]
    with pytest.raises(RecordError, match="bad.jsonl line 2"):  # common.cli prints it as one line
        prepare_sft.main(argv)
    prepare_sft.main(argv + ["--skip_bad"])
    assert "5 records read, 2 kept, skipped: malformed 3" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "data" / "chat" / "meta.json")


# ----------------------------------------------------------------------------- length and targets

def exchange(k):
    return [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"answer {k}"}]


def test_truncation_keeps_the_system_turn_and_the_latest_exchanges(tmp_path, char_base):
    tok = tokenizer.CharTokenizer.from_text(ALPHABET)
    tok.add_special_tokens(tokenizer.CHAT_TOKENS)
    system = [{"role": "system", "content": "Be brief."}]
    messages = system + exchange(1) + exchange(2) + exchange(3) + exchange(4)
    expected = system + exchange(3) + exchange(4)
    max_length = len(tokenizer.render_conversation(tok, expected)[0])  # one token short of 3 exchanges
    kept, ids, mask = tokenizer.fit_conversation(tok, messages, max_length)
    assert kept == expected and len(ids) == max_length
    assert tokenizer.fit_conversation(tok, system + exchange(4), 12) is None  # even the last exchange is too long

    summary, out = build(tmp_path, char_base, [{"conversations": messages}], max_length=max_length)
    assert tokenizer.from_meta(tokenizer.load_meta(out)).decode(train_examples(out)[0][0]) == rendered(expected)
    assert summary["truncated"] == 1 and summary["skipped"]["too_long"] == 0
    summary, _ = build(tmp_path, char_base, [{"conversations": messages}], max_length=12)
    assert summary["skipped"]["too_long"] == 1 and summary["kept"] == 1  # the val record


def test_conversations_without_a_target_are_dropped(tmp_path, char_base):
    no_assistant = {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    # Only the trailing user turn fits, and it has no target.
    cut_to_user = {"conversations": [{"role": "user", "content": "a"},
                                     {"role": "assistant", "content": "b" * 50},
                                     {"role": "user", "content": "c" * 5}]}
    summary, _ = build(tmp_path, char_base, [no_assistant, cut_to_user, FORMATS["alpaca"]], max_length=20)
    assert summary["skipped"]["no_target"] == 2 and summary["kept"] == 2
    assert summary["records_read"] == summary["kept"] + sum(summary["skipped"].values())


def test_loss_mask_at_token_level(tmp_path, char_base):
    """Targets are exactly the assistant content and its <|end|>, seen through the loader's
    shift: y[i] = x[i+1], and y[i] counts only where the token it predicts is a target."""
    messages = [{"role": "system", "content": "Be kind"},   # ids 0..8:   <s> B e _ k i n d <e>
                {"role": "user", "content": "hi"},          # ids 9..12:  <u> h i <e>
                {"role": "assistant", "content": "yo"},     # ids 13..16: <a> y o <e>
                {"role": "user", "content": "ok?"},         # ids 17..21: <u> o k ? <e>
                {"role": "assistant", "content": "sure"}]   # ids 22..27: <a> s u r e <e>
    _, out = build(tmp_path, char_base, [{"conversations": messages}])
    tok = out_tokenizer(out)
    ids, mask = train_examples(out)[0]
    assert len(ids) == 28
    assert np.flatnonzero(mask).tolist() == [14, 15, 16, 23, 24, 25, 26, 27]

    loader = data.Examples(out, "train", block_size=64, batch_size=1,
                           vocab_size=tok.vocab_size, shuffle=False)
    x, y, w = loader.collate([0])
    x, y = x[0].tolist(), y[0].tolist()
    assert w is None and len(x) == len(y) == 27
    assert x == ids[:-1].tolist()
    targets = [i for i, t in enumerate(y) if t != -1]
    assert targets == [13, 14, 15, 22, 23, 24, 25, 26]  # x[13] is <|assistant|>, it predicts "y"
    assert all(y[i] == ids[i + 1] for i in targets)
    assert tok.decode([y[i] for i in targets]) == "yo<|end|>sure<|end|>"
    assert x[13] == tok.token_id("<|assistant|>") and x[22] == tok.token_id("<|assistant|>")


def test_meta_is_the_base_tokenizer_plus_chat_tokens(tmp_path, char_base):
    summary, out = build(tmp_path, char_base, [FORMATS["minimind"]])
    meta, base = tokenizer.load_meta(out), tokenizer.load_meta(char_base)
    n = len(base["chars"])
    assert meta["chars"] == base["chars"] and meta["task"] == "sft" and meta["base"] == char_base
    assert meta["special_tokens"] == {name: n + i for i, name in enumerate(tokenizer.CHAT_TOKENS)}
    assert meta["vocab_size"] == n + len(tokenizer.CHAT_TOKENS)
    assert meta["source"]["kept"] == summary["kept"]


def test_val_fraction_is_seeded_and_never_empty(tmp_path, char_base):
    records = [{"conversations": exchange(k)} for k in range(10)]
    path = write_records(tmp_path / "in.jsonl", records)
    runs = [build_sft_dataset([path], char_base, str(tmp_path / name), val_fraction=0.01, seed=seed)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    assert [r["splits"]["val"]["examples"] for r in runs] == [1, 1, 1]
    assert [r["splits"]["train"]["examples"] for r in runs] == [9, 9, 9]
    read = lambda name: open(tmp_path / name / "val.bin", "rb").read()
    assert read("a") == read("b")
    assert not os.path.exists(tmp_path / "a" / "_all.bin")  # the temporary split is removed


def test_val_split_does_not_move_with_max_length(tmp_path, char_base):
    """Val is drawn per record read: a shorter --max_length drops examples from both splits
    but never moves one across (a base pretrained on one version's train split must not have
    seen another version's val)."""
    records = [{"conversations": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a" * (1 + 3 * k) + str(k)}]}
               for k in range(40)]
    path = write_records(tmp_path / "in.jsonl", records)
    sets = {}
    for max_length in (200, 60):
        out = str(tmp_path / f"m{max_length}")
        build_sft_dataset([path], char_base, out, max_length=max_length, val_fraction=0.25, seed=3)
        sets[max_length] = {split: {bytes(ids) for ids, _ in train_examples(out, split)}
                            for split in ("train", "val")}
    assert len(sets[200]["val"]) == 10 and len(sets[200]["train"]) == 30  # all 40 fit 200
    assert 0 < len(sets[60]["val"]) < 10 and len(sets[60]["train"]) < 30  # long ones dropped
    assert sets[60]["val"] <= sets[200]["val"] and sets[60]["train"] <= sets[200]["train"]


# ----------------------------------------------------------------------------- real data

def test_real_alpaca_file_with_gpt2_base(tmp_path, gpt2_available):
    path = shared_path("data", "sft", "alpaca_en_demo.json")
    base = make_base(tmp_path / "base", tokenizer.TiktokenTokenizer("gpt2"))
    out = str(tmp_path / "alpaca")
    s = build_sft_dataset([path], base, out)
    assert s["records_read"] == s["kept"] == 999
    assert sum(s["skipped"].values()) == s["flattened_values"] == s["truncated"] == 0
    assert s["splits"]["val"]["examples"] == 50 and s["splits"]["train"]["examples"] == 949
    tok = out_tokenizer(out)
    assert tok.vocab_size == 50257 + len(tokenizer.CHAT_TOKENS)
    for split, counts in s["splits"].items():
        tokens = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)
        mask = np.fromfile(os.path.join(out, f"{split}.mask.bin"), dtype=np.uint8)
        starts = np.fromfile(os.path.join(out, f"{split}.idx"), dtype=np.uint64).astype(np.int64)
        assert len(tokens) == counts["tokens"] and int(mask.sum()) == counts["targets"]
        assert len(starts) == counts["examples"]
        assert (tokens[starts] == tok.token_id("<|user|>")).all()       # no system turn in this file
        ends = np.append(starts[1:], len(tokens)) - 1
        assert (tokens[ends] == tok.token_id("<|end|>")).all() and mask[ends].all()
        assert len(data.Examples(out, split, 1024, 4, tok.vocab_size)) == counts["examples"]
    assert s["tokens"] == sum(c["tokens"] for c in s["splits"].values())
