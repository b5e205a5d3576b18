"""Tables and plots of scores and results."""
