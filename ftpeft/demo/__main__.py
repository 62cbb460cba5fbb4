"""Run the demo: ``python -m ftpeft.demo``."""

import sys

from . import main

sys.exit(main())
