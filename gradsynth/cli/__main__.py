"""``python -m gradsynth.cli ...`` runs the command line."""

import sys

from gradsynth.cli import main

sys.exit(main())
