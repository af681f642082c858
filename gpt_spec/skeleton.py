"""The other seed's §4.1 skeleton: its layout of DummyGPTModel(final_norm="layernorm")'s state dict.

That skeleton names its final norm `norm` and its head `head`, keeps its positions in a bare
`nn.Parameter` `pos_emb` of shape (1, context_length, emb_dim), and normalises with torch's
`nn.LayerNorm` (`weight`, `bias`; eps 1e-5 and the biased variance: the book's LayerNorm, whose
`scale` and `shift` they are). `SKELETON` maps it onto the canonical layout, as `gpt_spec.formats.hf` maps
HF's; both twins' `load_state_dict` (and the torch twin's `model.load_state_dict`) go through
`canonical_state_dict`, so they recognise it, and refuse a broken one, alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tensors import check_keys

# Skeleton name -> canonical name. `pos_emb` is the canonical (context_length, emb_dim) table
# with a leading batch axis of 1.
SKELETON = {
    "tok_emb.weight": "tok_emb.weight",
    "pos_emb": "pos_emb.weight",
    "norm.weight": "final_norm.scale",
    "norm.bias": "final_norm.shift",
    "head.weight": "out_head.weight",
}
_BATCHED = "pos_emb"
_TO_SKELETON = {canonical: name for name, canonical in SKELETON.items()}
# Names that only one of the two layouts has: any of the first marks a dict as the skeleton's.
_SKELETON_ONLY = tuple(name for name in SKELETON if name not in _TO_SKELETON)
_CANONICAL_ONLY = tuple(canonical for canonical in SKELETON.values() if canonical not in SKELETON)
LAYOUT = f"the skeleton layout ({', '.join(_SKELETON_ONLY)})"


def is_skeleton_layout(sd: Any) -> bool:
    """Whether `sd` is a state dict holding a tensor only the skeleton has."""
    return isinstance(sd, Mapping) and any(isinstance(k, str) and k in _SKELETON_ONLY for k in sd)


def skeleton_shapes(expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A model's canonical `{name: shape}` as the skeleton names and shapes it; a name the
    skeleton has no counterpart for (a transformer block's) stays canonical."""
    shapes = {}
    for name, shape in expected.items():
        skeleton = _TO_SKELETON.get(name, name)
        shapes[skeleton] = (1, *shape) if skeleton == _BATCHED else tuple(shape)
    return shapes


def canonical_state_dict(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, Any], model_name: str
) -> Mapping[str, Any]:
    """`given` in the canonical layout: a dict in the skeleton layout is checked against the model's
    canonical `{name: shape}` (every key there, none more, each of its shape and a float dtype; a
    dict mixing both layouts is refused) and renamed, `pos_emb` losing its batch axis; any other
    dict is returned as it is, for `check_state_dict` to check. Values are not copied (a lazy
    dict's are read)."""
    if not is_skeleton_layout(given):
        return given
    mixed = [name for name in _CANONICAL_ONLY if name in given]
    if mixed:
        skeleton = next(name for name in _SKELETON_ONLY if name in given)
        raise ValueError(
            f"state dict mixes two layouts: {skeleton!r} of {LAYOUT}, {mixed[0]!r} of the canonical layout; use one"
        )
    check_keys(
        skeleton_shapes(expected),
        given,
        model_name,
        what=f"state dict in {LAYOUT}",
        context_length=expected[SKELETON[_BATCHED]][0],
    )
    return {SKELETON.get(name, name): _unbatched(name, given[name]) for name in given}


def _unbatched(name: str, value: Any) -> Any:
    """`pos_emb`'s (1, T, C) as the canonical (T, C), a view of whatever array type it is."""
    return value[0] if name == _BATCHED else value


__all__ = ["LAYOUT", "SKELETON", "canonical_state_dict", "is_skeleton_layout", "skeleton_shapes"]
