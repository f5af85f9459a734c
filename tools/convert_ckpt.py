"""Convert EVE checkpoints: export (native / Hugging Face), reshard (ep_size), import-beitv2
(same as `eve-convert`; see eve_ds/cli/convert.py)."""

import sys

from eve_ds.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
