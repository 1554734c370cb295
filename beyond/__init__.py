"""Everything the book's recipe leaves out, in rooms named for what they hold (docs/house.md):
helpers the recipe calls, which import nothing from the top, and drivers that run it from outside.
"""
import importlib
import re


class UserError(Exception):
    """Bad input: the message names the problem and the fix, and is shown as one line."""

    def __init__(self, message=""):
        # A DataLoader raises a worker's error again, with the worker's traceback as the message:
        # its last line holds the worker's message
        if "Original Traceback" in message:
            message = re.sub(r"^[\w.]*UserError: ", "", message.strip().splitlines()[-1])
        super().__init__(re.sub(r"\s*\n\s*", " ", message))  # a value's repr: an array's lines


def importable(module):
    """Whether module imports: an optional package (matplotlib, tensorboard) is installed, and no
    folder of its name in the working folder stands in its place."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
