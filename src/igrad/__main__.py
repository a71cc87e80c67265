"""``python -m igrad`` (also what ``torchrun -m igrad train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
