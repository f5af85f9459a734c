"""User errors and the one-line report every command gives for them.

A user error is something the person running a command can fix: a file that does not exist, a value
that cannot be used, a corpus that came out empty. Its message names the file, key or value and says
what to do; the command prints it as one line and exits 2:

    eve-make-shards: error: annotation file not found (ann.json); check --input

Anything else is a bug and keeps its traceback. `--debug` on any command wrapped here shows the
traceback of a user error too. A command adopts this with two lines:

    from eve_ds.utils.errors import cli_main

    @cli_main("eve-make-shards")
    def main(argv: list[str] | None = None) -> int: ...
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2  # argparse's code for a bad command line: the same code for every user error
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """An input the user can fix; the message is "<what> (<file/key/value>); <what to do>", one line."""


def one_line(prog: str, error: BaseException) -> str:
    """`prog: error: message` with the message's line breaks folded (a report is one line)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{prog}: error: {message}"


def run_cli(
    prog: str,
    main_fn: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run `main_fn(argv)`; a UserError (or one of `user_errors`) becomes one line on stderr and exit 2.

    `--debug` is taken out of argv here, so a command's own parser never sees it: with it a user error
    is re-raised with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        code = main_fn(args)
    except (UserError, *user_errors) as e:
        if debug:
            raise
        print(one_line(prog, e), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if code is None else code


def cli_main(prog: str, user_errors: tuple[type[BaseException], ...] = ()) -> Callable:
    """Decorator form of `run_cli` for a `main(argv: list[str] | None = None) -> int`."""

    def wrap(main_fn: Callable) -> Callable[[list[str] | None], int]:
        @functools.wraps(main_fn)
        def main(argv: list[str] | None = None) -> int:
            return run_cli(prog, main_fn, argv, user_errors)

        return main

    return wrap
