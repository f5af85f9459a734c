"""Convert image-caption annotations into webdataset shards with a manifest. (same as `eve-make-shards`; see eve_ds/cli/make_shards.py)."""

import sys

from eve_ds.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
