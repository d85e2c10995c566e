"""The HTTP API of `reactor serve`: releases, nodes, commands and a live event stream over the same bus and store."""
