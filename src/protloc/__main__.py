"""``python -m protloc`` runs the command line."""

from __future__ import annotations

import sys

from protloc.cli import main

sys.exit(main())
