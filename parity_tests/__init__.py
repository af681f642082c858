"""The parity suite: the comparator and bounds, one module per kind of evidence (the whole forward,
each layer, training, the mesh), the planted-bug zoo, the benchmark and the gpt-parity CLI."""
