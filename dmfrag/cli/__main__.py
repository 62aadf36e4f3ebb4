"""``python -m dmfrag.cli``: the same as the ``dmfrag`` command."""

import sys

from . import main

sys.exit(main())
