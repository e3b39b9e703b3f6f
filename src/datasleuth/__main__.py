"""``python -m datasleuth``: the command line (same as ``datasleuth``)."""

import sys

from datasleuth.cli import main

sys.exit(main())
