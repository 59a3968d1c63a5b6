"""`python -m suzak` is the `suzak` command."""

import sys

from suzak.cli import main

sys.exit(main())
