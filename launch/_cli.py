"""What every entry script shares: bad input ends in one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from megatrain.errors import UserError
from tokenizer import InputError


def run(main: Callable[[], int | None]) -> None:
    """Run `main`; a user error prints `error: <one line>` and exits 2 (set
    MEGATRAIN_DEBUG=1 for the traceback)."""
    try:
        sys.exit(main() or 0)
    except (UserError, InputError) as e:
        if os.environ.get("MEGATRAIN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
