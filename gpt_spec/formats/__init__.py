"""The files the twins read and write, one module per format."""
