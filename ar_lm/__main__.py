import sys

from ar_lm.cli import main

sys.exit(main())
