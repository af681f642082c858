"""The models both twins build, named once: here and nowhere else.

A model is named by its class (`ModelClass`: what each twin's module defines and a checkpoint's
metadata records) everywhere but on the command line and in the parity engine, whose `--model`
takes its short name (`ModelKind`). Each is a `StrEnum`: a member is equal to its string, so a
plain "GPTModel" or "gpt" is accepted wherever a member is, and JSON writes the string.
"""

from __future__ import annotations

import enum


class _Name(enum.StrEnum):
    # repr as the plain string's: a refusal that shows a name with !r reads the same for a member
    def __repr__(self) -> str:
        return repr(self.value)


class ModelClass(_Name):
    """A model both twins build, by its class name in gpt_torch and gpt_flax."""

    GPT_MODEL = "GPTModel"  # the GPT of §4.6
    DUMMY_GPT_MODEL = "DummyGPTModel"  # the §4.1 skeleton

    @property
    def kind(self) -> ModelKind:
        """The short name of this model (`--model gpt` for GPTModel)."""
        return _KINDS[self]


class ModelKind(_Name):
    """A model both twins build, by the short name `gpt-parity --model` and the engine take."""

    GPT = "gpt"
    DUMMY = "dummy"

    @property
    def model_class(self) -> ModelClass:
        """The class this short name builds (GPTModel for "gpt")."""
        return _CLASSES[self]


_CLASSES = {ModelKind.GPT: ModelClass.GPT_MODEL, ModelKind.DUMMY: ModelClass.DUMMY_GPT_MODEL}
_KINDS = {cls: kind for kind, cls in _CLASSES.items()}


class FinalNorm(_Name):
    """DummyGPTModel's final_norm option: the book's placeholder (the default), or a real LayerNorm."""

    DUMMY = "dummy"
    LAYER_NORM = "layernorm"


def check_model(model: object) -> ModelClass:
    """Refuse a name that is not a model class's (a short name such as "gpt" included); return it."""
    if not isinstance(model, str) or model not in tuple(ModelClass):
        raise ValueError(f"model must be one of {', '.join(ModelClass)}, got {model!r}")
    return ModelClass(model)


__all__ = ["FinalNorm", "ModelClass", "ModelKind", "check_model"]
