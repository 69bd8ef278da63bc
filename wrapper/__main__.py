"""``python -m wrapper``: the same as the ``sp-wrapper`` command."""

import sys

from wrapper.runner import main

if __name__ == "__main__":
    sys.exit(main())
