"""The `gpt-parity` command: one module per subcommand, one renderer (tables, plots, JSON, progress)."""
