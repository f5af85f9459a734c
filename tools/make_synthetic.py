"""Generate the synthetic shapes corpus (train/ and val/ shards with manifests), deterministic by seed. (same as `eve-make-synthetic`; see eve_ds/cli/make_synthetic.py)."""

import sys

from eve_ds.cli.make_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
