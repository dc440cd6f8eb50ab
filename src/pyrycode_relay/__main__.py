"""`python -m pyrycode_relay`: the same entry point as the console script."""

from pyrycode_relay.cli import main

raise SystemExit(main())
