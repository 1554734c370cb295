"""Everything the book's recipe leaves out, in rooms named for what they hold (docs/house.md):
helpers the recipe calls, which import nothing from the top, and drivers that run it from outside.
"""
import importlib
import re
import unicodedata


class UserError(Exception):
    """Bad input: the message names the problem and the fix, and is shown as one line."""

    def __init__(self, message=""):
        # A DataLoader raises a worker's error again, with the worker's traceback as the message:
        # its last line holds the worker's message
        if "Original Traceback" in message:
            message = re.sub(r"^[\w.]*UserError: ", "", message.strip().splitlines()[-1])
        super().__init__(shown(message))  # a newline in a name: shown, not obeyed


def shown(path):
    """path (or any text) as one line of text: non-UTF-8 bytes and control characters escaped."""
    text = path.encode(errors="surrogateescape").decode(errors="backslashreplace")
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


def quoted(value):
    """value's repr in a message: on one line (an array's spreads over several), cut to 80."""
    text = re.sub(r"\s*\n\s*", " ", repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def importable(module):
    """Whether module imports: an optional package (matplotlib, tensorboard) is installed, and no
    folder of its name in the working folder stands in its place."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
