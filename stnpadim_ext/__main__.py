"""`python -m stnpadim_ext ...`: the `stnpadim` command line."""
from .cli import main

raise SystemExit(main())
