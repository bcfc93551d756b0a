"""``python -m rlattr``: the ``rlattr`` command."""

import sys

from rlattr.cli import main

sys.exit(main())
