"""One module per subcommand: `add_parser` adds its arguments, `run` runs it."""
