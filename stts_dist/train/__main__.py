import sys

from stts_dist.train.cli import main

sys.exit(main())
