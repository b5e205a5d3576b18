"""The ``simdiff`` command line: every subcommand's parser and printing."""
