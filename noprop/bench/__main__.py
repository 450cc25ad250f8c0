"""`python -m noprop.bench`: the same as `noprop bench` (and the entry of its isolated workers)."""
import sys

from noprop.bench.cli import main

sys.exit(main())
