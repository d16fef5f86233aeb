"""``python -m lorakit ...`` is the ``lorakit`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
