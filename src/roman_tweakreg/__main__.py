"""``python -m roman_tweakreg``: the ``roman-tweakreg`` command."""

import sys

from .cli import main

sys.exit(main())
