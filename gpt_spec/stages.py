"""The names of a forward's stages, as both twins record them (`model(ids, return_activations=True)`),
and their order: what a parity report is read by. Stages are matched and ordered by these names,
never by the position of an output in a dict (jax.jit returns dicts sorted by key)."""

from __future__ import annotations

SUB_LAYERS = ("norm1", "att", "residual", "norm2", "ff")  # inside a TransformerBlock, in order


def stage_names(n_layers: int, *, sub_layers: bool = True) -> list[str]:
    """drop_emb; per block norm1, att, residual, norm2, ff (with `sub_layers`) and the block's
    output trf_blocks.{i}; final_norm; out_head (the logits)."""
    names = ["drop_emb"]
    for i in range(n_layers):
        if sub_layers:
            names += [f"trf_blocks.{i}.{s}" for s in SUB_LAYERS]
        names.append(f"trf_blocks.{i}")
    return names + ["final_norm", "out_head"]


def stage_of(name: str) -> str:
    """The stage a finding belongs to: its name's first word, cut to the sub-layer
    ("trf_blocks.0.att.W_query Linear, one-hot rows" -> "trf_blocks.0.att")."""
    path = name.split(" ", 1)[0].split(".")
    if path[0] == "trf_blocks":
        return ".".join(path[:3])
    return path[0]


def stage_key(name: str) -> tuple[int, int, int]:
    """Sort key of a stage (or a finding's name) in forward order."""
    path = stage_of(name).split(".")
    top = {"drop_emb": 0, "trf_blocks": 1, "final_norm": 2, "out_head": 3}
    if path[0] not in top:
        raise ValueError(f"unknown stage {name!r}")
    if path[0] != "trf_blocks":
        return top[path[0]], 0, 0
    sub = SUB_LAYERS.index(path[2]) if len(path) > 2 else len(SUB_LAYERS)  # the block's output last
    return 1, int(path[1]), sub


def in_stage(name: str, where: str) -> bool:
    """Whether a finding or stage lies at `where`: a stage ("trf_blocks.0.norm1") or a block
    ("trf_blocks.0", which holds its sub-layers)."""
    stage = stage_of(name)
    return stage == where or stage.startswith(where + ".")
