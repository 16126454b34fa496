"""What the command lines share: user mistakes are one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


def run_cli(parse_args: Callable, run: Callable, argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
