"""The commands the README and docs/ print work as printed: every `python X.py ...` line of
their bash blocks names a script that exists, a config file that exists, and only keys (or
flags) that script takes, with values it accepts; the digits quick start runs end to end,
shrunk. A README command cannot break silently again."""
import functools
import glob
import os
import re
import shlex

import pytest

from conftest import ROOT, run_script

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def commands(path: str) -> list[tuple[str, list[str]]]:
    """(where, argv) of each `python script ...` line in the page's bash blocks, continuation
    lines joined, comments cut; lines with placeholders (<run>, [optional], ...) are left out."""
    text = open(path, encoding="utf-8").read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"^(OMP_NUM_THREADS=\d+ |time )+", "", line)
            if not line.startswith("python ") or re.search(r"[<\[]|\.\.\.|\|", line) or "&&" in line:
                continue
            found.append((f"{os.path.basename(path)}: {line}", shlex.split(line)[1:]))
    return found


ALL = [c for page in PAGES for c in commands(page)]


def settings_of(script: str):
    """The settings class of an entry script, or None for argparse scripts (prepare/)."""
    import bench, dpo, eval as danlu_eval, export, sample, serve, sft, train  # noqa: E401
    return {"train.py": train.TrainConfig, "sft.py": sft.SFTConfig, "dpo.py": dpo.DPOConfig, "sample.py": sample.SampleConfig,
            "eval.py": danlu_eval.EvalConfig, "export.py": export.ExportConfig, "serve.py": serve.ServeConfig,
            "bench.py": bench.BenchConfig}.get(script)


@functools.cache
def script_help(script: str) -> str:
    return run_script(script, "--help").stdout


def test_the_pages_print_commands():
    assert len(ALL) > 40, len(ALL)


@pytest.mark.parametrize("where,argv", ALL, ids=[w[:90] for w, _ in ALL])
def test_a_printed_command_names_real_scripts_files_and_keys(where, argv):
    from settings import load_config
    script, args = argv[0], argv[1:]
    assert os.path.exists(os.path.join(ROOT, script)), where
    cls = settings_of(script)
    if "--help" in args:
        assert script_help(script).strip(), where
        return
    if cls is None:  # an argparse script: every flag it is given must be in its --help
        shown = script_help(script)
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=")[0] in shown, f"{where}: {arg} is not a flag of {script}"
        return
    if script == "eval.py" and args and args[0] in ("--compare", "--plot"):
        args = [a for a in args[1:] if a.startswith("--")]
    if script == "serve.py":
        args = [a for a in args if not a.startswith("--out_dir")]
    if args and not args[0].startswith("--"):
        assert os.path.exists(os.path.join(ROOT, args[0])), f"{where}: no config file {args[0]}"
        args = [os.path.join(ROOT, args[0])] + args[1:]
    cwd = os.getcwd()
    os.chdir(ROOT)  # config files compute paths relative to the repo root
    try:
        load_config(cls, args)  # unknown keys, wrong types and out-of-range values raise ConfigError
    finally:
        os.chdir(cwd)


def test_the_digits_quick_start_runs_shrunk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_script("prepare/tiny_cls.py")
    run_script("train.py", os.path.join(ROOT, "config/tiny_cls.py"), "--max_iters=20", "--eval_interval=10")
    r = run_script("sample.py", "--out_dir=weight/tiny_cls", "--classify")
    assert "accuracy" in r.stdout
    run_script("eval.py", "--out_dir=weight/tiny_cls")
    assert os.path.exists("weight/tiny_cls/confusion.png")
