"""python -m lingua_scheduler.server: see server/main.py."""

import sys

from .main import main

sys.exit(main())
