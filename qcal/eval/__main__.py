"""``python -m qcal.eval --task wikitext``: see :mod:`qcal.eval.cli`."""

import sys

from .cli import main

sys.exit(main())
