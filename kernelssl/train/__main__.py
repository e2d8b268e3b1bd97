"""``python -m kernelssl.train`` (see :mod:`kernelssl.train`)."""
import sys

from .loop import main

sys.exit(main())
