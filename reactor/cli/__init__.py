"""The `reactor` command line."""
