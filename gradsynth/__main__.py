"""``python -m gradsynth ...`` runs the command line, as ``gradsynth`` and ``python -m gradsynth.cli`` do."""

import sys

from gradsynth.cli import main

sys.exit(main())
