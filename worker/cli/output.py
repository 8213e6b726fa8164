"""How the commands print: one rich console, safe for what messages carry."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def console() -> "Console":
    """Rich output; when piped (no terminal), wide enough that tables are not cut. Markup is off:
    what is printed comes from messages (ids, notes, errors), and a value such as "[/x]" read as
    markup crashed the command."""
    from rich.console import Console

    return Console(markup=False) if sys.stdout.isatty() else Console(markup=False, width=200)
