"""The parity suite and its harness: comparator, report, benchmark and the gpt-parity CLI."""
