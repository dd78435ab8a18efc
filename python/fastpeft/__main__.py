"""`python -m fastpeft ...` and `torchrun -m fastpeft sft ...`: the `fastpeft` command."""

import sys

from fastpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
