"""``python -m datasleuth.cli`` (and ``torchrun ... -m datasleuth.cli``): the command line."""

import sys

from datasleuth.cli.main import main

sys.exit(main())
