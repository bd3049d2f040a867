"""
How danlu writes files: atomically (a temp file beside it, fsync, rename), so a crash at any
moment leaves the old file or the new one, never half of one; and only where it may (the output
policy: a destination holding what this command did not write is refused unless --overwrite).
Every writer goes through here.
"""
import contextlib
import glob
import json
import os
import sys


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """Open a temp file beside path for writing; on success fsync it, rename it over path and
    fsync the folder, so a crash at any moment leaves the old file or the new one, never half.
    On failure the temp file is removed and the old file is untouched. Temp files left by a
    killed writer (kill -9, power loss) are removed the next time path is written."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.*.tmp")):
        pid = stale.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            os.remove(stale)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the output policy

MANIFEST = ".danlu-output.json"  # which command wrote a folder, and which files


class DestinationError(ValueError):
    """A destination that holds what this command did not write: nothing was written."""


def claim_folder(dest: str, command: str, overwrite: bool = False) -> None:
    """Make sure `command` may write into folder dest: it is new or empty, or every file in it
    was written by the same command before (its manifest says so). A folder holding anything
    else (the user's files, a training run, another command's output) is refused with one line
    naming the folder and the choices, unless overwrite, which says what it replaces. A writer
    calls this before writing and record_folder() after."""
    if os.path.isfile(dest):
        raise DestinationError(f"{dest} is a file; give a folder (new or empty) to write into")
    if not os.path.isdir(dest):
        return
    present = sorted(n for n in os.listdir(dest) if n != MANIFEST)
    manifest = _read_manifest(dest)
    ours = manifest.get("command") == command and set(present) <= set(manifest.get("files", []))
    if not present or ours:
        return
    shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
    what = "a training run" if {"ckpt.pt", "best.pt", "ckpt.dcp", "best.dcp"} & set(present) else "files this command did not write"
    if not overwrite:
        raise DestinationError(f"{dest} holds {what} ({shown}); pick a new folder, or pass --overwrite to "
                               "replace what this command writes there")
    print(f"--overwrite: writing into {dest}, which holds {what} ({shown}); files of the same name are replaced",
          file=sys.stderr)


def record_folder(dest: str, command: str) -> None:
    """Note in dest that command wrote the files now there (claim_folder lets it write again)."""
    files = sorted(n for n in os.listdir(dest) if n != MANIFEST and not n.endswith(".tmp"))
    with atomic_write(os.path.join(dest, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"command": command, "files": files}, f, indent=1)


def claim_file(path: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """A single output file: never one of the command's inputs, never an existing file unless
    overwrite."""
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(p, path) for p in inputs):
        raise DestinationError(f"{path} is an input of this command; give another output file")
    if os.path.exists(path) and not overwrite:
        raise DestinationError(f"{path} exists; give another output file, or pass --overwrite to replace it")


def _read_manifest(dest: str) -> dict:
    try:
        with open(os.path.join(dest, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        return {}
