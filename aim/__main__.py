"""`python -m aim ...` is the same as the `aim` command."""

import sys

from .cli import main

sys.exit(main())
