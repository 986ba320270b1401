"""``python -m kosmos2_ref ...`` runs the command line (see :mod:`kosmos2_ref.cli`)."""

import sys

from .cli import main

sys.exit(main())
