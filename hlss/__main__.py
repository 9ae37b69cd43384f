"""``python -m hlss``: the ``hlss`` command (also under ``torchrun ... -m hlss train ...``)."""

import sys

from .cli import main

sys.exit(main())
