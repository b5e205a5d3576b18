"""Base modules every stage may use: errors, progress bars, the output contract."""
