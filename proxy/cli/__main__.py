"""``python -m proxy.cli``: the pixazo-proxy command."""

import sys

from . import main

sys.exit(main())
