"""User-facing errors: each message names the offending value and how to fix it."""


class SimdiffError(ValueError):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = 2


class PartialOutputError(SimdiffError):
    """The main output was saved (complete, verified), but an extra file was not; the CLI exits 3."""

    exit_code = 3


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return a ' Did you mean X?' hint for a misspelt name (empty when nothing is close)."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces collapsed (error messages are one line)."""
    return " ".join(text.split())
