"""``python -m mesh.hbone``: see :mod:`mesh.hbone.cli`."""

import sys

from mesh.hbone.cli import main

sys.exit(main())
