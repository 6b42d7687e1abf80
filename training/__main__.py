"""`python -m pocketgpt.training [train|prepare|eval|import-hf] ...`; see training.cli."""

import sys

from pocketgpt.training.cli import main
from pocketgpt.training.interrupt import exit_now_if_abandoned

if __name__ == "__main__":
    code = main()
    exit_now_if_abandoned(code)  # a signal cut a native call short: do not wait for it to finish
    sys.exit(code)
