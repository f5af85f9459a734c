"""The Table 2 reproduction's report of a run root: RUN_ROOT/report.md + report.json (same as `eve-report`;
see eve_ds/cli/table2_report.py). Works on a partial chain."""

import sys

from eve_ds.cli.table2_report import main

if __name__ == "__main__":
    sys.exit(main())
