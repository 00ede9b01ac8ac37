"""Which view the demo's output gets: one JSON object per line, a rich live table, or plain lines.

rich is optional (the ``demo`` extra): the rich view is imported here only, and only when the
output is a terminal; without rich the plain view is used. The library never imports the demo.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from procsup.demo.view import JsonView, PlainView, View

__all__ = ["make_view"]


def make_view(as_json: bool, stream: IO[str] | None = None) -> View:
    """The JSON view if asked, the rich live view on a terminal with rich, else the plain view."""
    out = sys.stdout if stream is None else stream
    if out is None:  # stdout closed (``>&-``): the story runs, unseen; its exit status tells
        out = open(os.devnull, "w")  # noqa: SIM115 - the process's stdout from now on
    if as_json:
        return JsonView(out)
    if out.isatty():
        # Imported here, not at the top, only because rich is an optional extra: without it the
        # demo still runs, in plain lines. No cycle: rich_view imports view and rows, not this.
        try:
            from procsup.demo.rich_view import RichView
        except ImportError:  # the demo extra is not installed: degrade to plain lines
            return PlainView(out)
        return RichView(out)
    return PlainView(out)
