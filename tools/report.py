"""The Table 2 reproduction's report of a run root: RUN_ROOT/report.md + report.json (same as `eve-report`;
see eve_ds/cli/reproduce.py). Works on a partial chain."""

import sys

from eve_ds.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
