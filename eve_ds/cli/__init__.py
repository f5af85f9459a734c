"""The console scripts (`eve-pretrain`, `eve-evaluate`, `eve-info`, ...): argument parsing and output only;
the work is done by the library. Every entry point is `main(argv: list[str] | None = None) -> int`.

DeepSpeed logs to stdout, and warns on import when it finds no GPU; stdout is the scripts' output
(`--json`), so DeepSpeed is imported here, once, with its log handler bound to stderr.
"""

import contextlib
import sys

with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401
