"""``python -m looplm``: the ``looplm`` command."""

import sys

from looplm.cli import main

sys.exit(main())
