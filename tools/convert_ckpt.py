"""Convert EVE checkpoints: export (native / Hugging Face), reshard (ep_size), import-beitv2.
See `python tools/convert_ckpt.py -h` and the README ("Checkpoint conversion")."""

import sys

from eve_ds.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
