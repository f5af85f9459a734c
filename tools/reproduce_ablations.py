"""The paper's pre-training ablations (Tables 5 and 6) at small scale: each task set pre-trained for the
same wall-clock budget, fine-tuned on synthetic VQA, NLVR2 and retrieval (same as `eve-ablations`; see
eve_ds/cli/ablations.py and docs/ablations.md)."""

import sys

from eve_ds.cli.ablations import main

if __name__ == "__main__":
    sys.exit(main())
