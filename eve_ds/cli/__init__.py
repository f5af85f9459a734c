"""The console scripts (`eve-pretrain`, `eve-evaluate`, `eve-info`, ...): argument parsing and output only;
the work is done by the library. Every entry point is `main(argv: list[str] | None = None) -> int`.

DeepSpeed logs to stdout, and warns on import when it finds no GPU; stdout is the scripts' output
(`--json`), so DeepSpeed is imported here, once, with its log handler bound to stderr. Where CUDA is not
available DeepSpeed is told so (`DS_ACCELERATOR=cpu`, unless set already): the CPU accelerator it would
pick anyway, without its "unable to detect" warning on every command. Only the scripts do this; `import
eve_ds` leaves the environment alone.
"""

import contextlib
import os
import sys

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401
