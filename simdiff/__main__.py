import sys

from simdiff.cli.main import main

sys.exit(main())
