"""`python -m twins_timm ...` is the same as the `twins-timm` console script."""
import sys

from .cli import main

sys.exit(main())
