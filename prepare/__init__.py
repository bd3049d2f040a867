"""
The prepare scripts (one per kind of source) and the one thing they share: opening a user's
file, so that a missing, unreadable or binary file is one line naming it, never a traceback.
"""
from data import DataError


def open_input(path: str):
    """path opened for reading bytes; a missing or unreadable file is a DataError naming it."""
    try:
        return open(path, "rb")
    except OSError as e:  # FileNotFoundError, IsADirectoryError, PermissionError
        raise DataError(f"{path}: {e.strerror.lower()}; check the path") from None


def decode_utf8(raw: bytes, path: str, first_line: int = 1) -> str:
    """raw as text; bytes that are not UTF-8 are a DataError naming the file and the line
    (first_line is the line raw starts on)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); is it a "
                        "binary file? Save it as UTF-8") from None


def read_utf8(path: str) -> str:
    """The whole text of a user's file, a leading byte-order mark removed."""
    with open_input(path) as f:
        return decode_utf8(f.read(), path).removeprefix("\ufeff")
