"""``python -m instance_saliency`` runs the command-line tool (as under ``torchrun -m``)."""

import sys

from .cli import main

sys.exit(main())
