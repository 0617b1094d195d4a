"""`python -m faceveil.cli ...`: the same as the `faceveil` command."""

import sys

from faceveil.cli.main import main

sys.exit(main())
