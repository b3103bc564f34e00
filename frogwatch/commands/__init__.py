"""CLI subcommands; see :mod:`frogwatch.cli`."""
