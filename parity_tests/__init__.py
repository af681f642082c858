"""The evidence engine: the comparator and its named bounds, rounding envelopes, one module per kind
of evidence (the whole forward, each layer, training, the mesh, chapter 5) and the planted-bug zoo
with its torch and Flax halves. Its reports are plain data; `parity_cli` draws them."""

# the twins by the names every report, option and file of the suite uses
TWINS = ("torch", "flax")
