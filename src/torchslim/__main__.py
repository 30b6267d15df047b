"""``python -m torchslim`` (also what ``torchrun -m torchslim`` starts)."""

import sys

from torchslim.cli import main

sys.exit(main())
