"""
Settings: every entry point's keys, their defaults and valid values, read from a flat config
file and --key=value flags, with --help and one-line errors. The bottom of the import graph:
it imports nothing of danlu's, so the model, data and checkpoint layers can all check values.

Defaults are a dataclass whose fields carry their valid values (setting(default, lo=..,
choices=..)); `config/<name>.py` is run in a namespace holding those defaults (so it may compute
values), then `--key=value` overrides apply. Unknown keys, values of the wrong type and values
out of range are errors that name the key, where it was set, and the fix.
"""
import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import traceback
import typing
from dataclasses import field, fields


class ConfigError(ValueError):
    """A config value that cannot work; .key names the offending key (None for a combination)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def setting(default, *, lo=None, hi=None, above=None, below=None, choices=None):
    """A config field whose valid values sit beside its default: lo <= v <= hi, above < v < below,
    or v in choices. Every config class (GPTConfig, train's, sft's, sample's, ...) is checked by
    check_settings() when it is built, so a bad value fails before anything runs."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "above": above, "below": below,
                                            "choices": choices})


def field_limits(cls, name: str) -> dict:
    """The valid values of field name: a subclass that re-declares a field to change its default
    keeps the parent's limits."""
    return next((g.metadata for c in cls.__mro__ for g in getattr(c, "__dataclass_fields__", {}).values()
                 if g.name == name and g.metadata), {})


def check_settings(cfg) -> None:
    """Raise ConfigError naming the first field of dataclass cfg outside its valid values."""
    for f in fields(cfg):
        v, m = getattr(cfg, f.name), field_limits(type(cfg), f.name)
        bad = None
        if isinstance(v, float) and not math.isfinite(v):
            bad = "must be a finite number"
        elif m.get("choices") is not None and v not in m["choices"]:
            bad = "choose one of " + ", ".join(map(str, m["choices"]))
        else:
            limits = [(m.get("lo"), ">=", lambda a, b: a >= b), (m.get("above"), ">", lambda a, b: a > b),
                      (m.get("hi"), "<=", lambda a, b: a <= b), (m.get("below"), "<", lambda a, b: a < b)]
            failed = [f"{op} {limit}" for limit, op, ok in limits if limit is not None and not ok(v, limit)]
            if failed:
                wanted = " and ".join(f"{op} {limit}" for limit, op, _ in limits if limit is not None)
                bad = f"must be {wanted}"
        if bad:
            raise ConfigError(f"{f.name} = {v!r}: {bad}", key=f.name)


# ----------------------------------------------------------------------------- config files and flags

_ACCEPTS = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _check_type(cls, key, value, where):
    """Config fields are int, float, bool or str; an int is accepted for a float."""
    hint = typing.get_type_hints(cls)[key]
    ok = isinstance(value, _ACCEPTS[hint]) and (hint is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} is a {type(value).__name__}, but {key} "
                          f"takes a {hint.__name__} (default: {getattr(cls(), key)!r})")
    return float(value) if hint is float else value


def _unknown(cls, key, where):
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def parse_cli_value(text: str):
    """--key=value: a Python literal when it parses as one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_config_file(path: str, namespace: dict) -> None:
    """Run a flat config file in namespace; a mistake in it is an error naming file:line."""
    if not path.endswith(".py"):
        raise ConfigError(f"{path}: a config file is a flat Python file of key = value lines "
                          "(config/<name>.py); pass other values as --key=value")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist (configs live in config/)")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), {}, namespace)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}: {(e.text or '').strip()!r}") from None
    except Exception as e:  # a name that is not a key, a failing computation
        line = next((fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path), "?")
        raise ConfigError(f"{path}:{line}: {type(e).__name__}: {e} (values are Python "
                          "literals or expressions of keys set above)") from None


def load_config(cls, argv: list[str]):
    """Build a `cls` dataclass from [config_file.py] [--key=value ...]; --help (or -h) prints
    every key with its default, valid values and meaning, and exits."""
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, os.path.basename(sys.argv[0]) or "danlu"))
        sys.exit(0)
    values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    where = {}  # key -> the file or "command line" that set it, for error messages
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        namespace = dict(values)
        run_config_file(path, namespace)
        for key, value in namespace.items():
            if key.startswith("_") or isinstance(value, type(sys)) or callable(value):
                continue  # imports, helpers and private names in a config are not keys
            if key not in values:
                raise _unknown(cls, key, path)
            if value is not values[key]:
                values[key], where[key] = _check_type(cls, key, value, path), path
    hints = typing.get_type_hints(cls)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"command line: {arg!r} is not of the form --key=value")
        key, _, text = arg[2:].partition("=")
        if key not in values:
            raise _unknown(cls, key, "command line")
        if "=" not in arg:  # --flag for a bool, --key value for the rest
            if hints[key] is bool:
                text = "True"
            elif args and not args[0].startswith("--"):
                text = args.pop(0)
            else:
                raise ConfigError(f"command line: --{key} needs a value (--{key}=...)")
        value = parse_cli_value(text)
        if hints[key] is str:
            value = text  # a string key takes the text as written (e.g. --out_dir=123)
        values[key], where[key] = _check_type(cls, key, value, "command line"), "command line"
    try:
        return cls(**values)
    except ConfigError as e:  # a value out of range: say where it was set
        raise ConfigError(f"{where.get(e.key, 'default')}: {e}", e.key) from None


def from_keys(cls, source, **changes):
    """A cls dataclass from the keys of a dict or of any object that has them (other keys
    ignored; a key it lacks takes its default), then `changes`."""
    get = source.get if isinstance(source, dict) else lambda k, d=None: getattr(source, k, d)
    known = {f.name: get(f.name, f.default) for f in fields(cls)}
    return cls(**{**{k: v for k, v in known.items() if v is not dataclasses.MISSING}, **changes})


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def changed_settings(cfg) -> str:
    """The keys whose value differs from the default, one `key = value` per line: what a run's
    start prints (the whole resolved config goes to config.json)."""
    default = type(cfg)()
    lines = [f"  {f.name} = {getattr(cfg, f.name)!r}" for f in fields(cfg)
             if getattr(cfg, f.name) != getattr(default, f.name)]
    return "\n".join(lines) or "  (all defaults)"


# ----------------------------------------------------------------------------- --help

_FIELD = re.compile(r"^    (\w+): [\w|. ]+ = (.*?)(?:\s+#\s*(.*))?$")
_SECTION = re.compile(r"^    #\s*(.*)$")


def field_notes(cls) -> tuple[dict[str, str], dict[str, str]]:
    """({key: the comment beside its default}, {key: the section comment above it}), read from
    the source of cls and its bases, so --help says what the code says and cannot drift."""
    notes, sections = {}, {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        section = klass.__name__.replace("Config", "").lower() or "settings"
        section = {"gpt": "model", "train": "training"}.get(section, section)
        for line in lines:
            f, m = _FIELD.match(line), _SECTION.match(line)
            if f:
                if f.group(3):
                    notes[f.group(1)] = f.group(3)
                sections.setdefault(f.group(1), section)
            elif m and len(m.group(1)) <= 40 and m.group(1)[:1].islower() and "." not in m.group(1):
                section = m.group(1)  # a short heading such as "# optimizer and schedule"
    return notes, sections


def valid_values(m: dict) -> str:
    if m.get("choices") is not None:
        return " | ".join(map(str, m["choices"]))
    parts = [f"{op} {m[k]}" for k, op in (("lo", ">="), ("above", ">"), ("hi", "<="), ("below", "<"))
             if m.get(k) is not None]
    return ", ".join(parts)


def help_text(cls, program: str) -> str:
    """Every key of cls, grouped by its section: --key=default, valid values, meaning."""
    notes, sections = field_notes(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    groups: dict[str, list[str]] = {}
    for f in fields(cls):
        valid = valid_values(field_limits(cls, f.name)) or hints[f.name].__name__
        line = f"  --{f.name}={getattr(default, f.name)!r}".ljust(34) + f" [{valid}]"
        if f.name in notes:
            line += f"  {notes[f.name]}"
        groups.setdefault(sections.get(f.name, "settings"), []).append(line)
    head = (f"usage: python {program} [config/<name>.py] [--key=value ...]\n\n"
            "A config file (config/*.py) is flat `key = value` lines run on top of the defaults;\n"
            "--key=value flags apply after it. Keys, defaults [valid values] and meaning:")
    body = "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in groups.items())
    return f"{head}\n\n{body}"


def cli(main) -> None:
    """Run an entry point's main(); a user error (bad config, data or checkpoint) prints one
    clear line and exits 1 instead of a traceback, Ctrl-C one line and exit 130 (every file
    danlu writes is written atomically, so an interrupted command leaves no half file).
    DANLU_DEBUG=1 shows the traceback."""
    try:
        main()
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # under torchrun: leave the group cleanly
    except KeyboardInterrupt:
        print("\ninterrupted; files already written are whole (danlu writes atomically)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as e:  # ConfigError, CheckpointError, DataError, ...
        if os.environ.get("DANLU_DEBUG"):
            raise
        print(f"error: {e}\n(set DANLU_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)
