import sys

from simdiff.cli import main

sys.exit(main())
