"""``python -m qcal.quantize``: quantize a Hugging Face checkpoint block by block, streamed from disk."""

import sys

from qcal.pretrained import main

sys.exit(main())
