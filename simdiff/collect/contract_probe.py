"""Contract check (reverted): collection must not reach up into the command line."""

import simdiff.cli  # noqa: F401
