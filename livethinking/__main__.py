"""``python -m livethinking`` is the ``livethinking`` command."""

import sys

from livethinking.cli import main

sys.exit(main())
