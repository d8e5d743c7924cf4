"""``python -m jlora.cli ...``: the ``jlora`` command."""

import sys

from jlora.cli import main

sys.exit(main())
