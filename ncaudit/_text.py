"""Text from data made safe for a terminal: control characters shown as escapes, never sent raw."""

from __future__ import annotations

import re

#: C0 and C1 control characters (ESC, BEL, CR, ... and the 8-bit CSI / OSC), DEL, and the Unicode bidirectional
#: overrides and isolates that reorder what a terminal shows. Escape sequences built from them set the window title,
#: clear the screen, draw OSC-8 links or hide text.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control character replaced by its Python escape (``\\x1b``, ``\\n``, ``\\u202e``).

    Used wherever a string that comes from data (class names, file names, provenance attributes, messages that quote
    them) reaches the terminal, so that a name cannot move the cursor, retitle the window, clear the screen, draw a
    hidden link or reverse the text around it. Printable characters of every script are kept as they are.
    """
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
