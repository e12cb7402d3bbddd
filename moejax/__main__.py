"""`python -m moejax ...`: the same command line as the `moejax` script (useful on a machine without the install)."""

import sys

from moejax.cli import main

sys.exit(main())
