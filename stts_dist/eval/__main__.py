"""``python -m stts_dist.eval`` (and ``torchrun -m stts_dist.eval``) = ``stts-eval``."""
import sys

from stts_dist.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
