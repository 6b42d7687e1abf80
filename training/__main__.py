"""`python -m pocketgpt.training [train|prepare|eval|import-hf] ...`; see training.cli."""

import sys

from pocketgpt.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
