"""`python -m orcd`: the orcd command (orcd.cli)."""
import sys

from .cli import main

sys.exit(main())
