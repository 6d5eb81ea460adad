"""``python -m moedsl`` (and ``torchrun -m moedsl run ...``)."""
import sys

from .cli import main

sys.exit(main())
