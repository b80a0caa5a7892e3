"""``python -m livethinking.train rft|grpo --config FILE [key=value ...]`` (e.g. under torchrun)."""

import sys

from livethinking.train.entry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
