from eve_ds.train.cli import main

raise SystemExit(main())
