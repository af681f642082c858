"""The models both twins build, named once: here and nowhere else.

A model is named by its class (what each twin's module defines and a checkpoint's metadata records)
everywhere but on the command line, whose `--model` takes the short names of MODEL_CLASSES.
"""

from __future__ import annotations

GPT_MODEL = "GPTModel"  # the GPT of §4.6
DUMMY_GPT_MODEL = "DummyGPTModel"  # the §4.1 skeleton
MODELS = (GPT_MODEL, DUMMY_GPT_MODEL)

GPT, DUMMY = "gpt", "dummy"  # `--model gpt`, `--model dummy`
MODEL_CLASSES = {GPT: GPT_MODEL, DUMMY: DUMMY_GPT_MODEL}
MODEL_KINDS = {cls: kind for kind, cls in MODEL_CLASSES.items()}

# DummyGPTModel's final_norm option: the book's placeholder (the default), or a real LayerNorm.
DUMMY_NORM, LAYER_NORM = "dummy", "layernorm"
FINAL_NORMS = (DUMMY_NORM, LAYER_NORM)


def check_model(model: object) -> str:
    """Refuse a name that is not a model class's (a CLI name such as "gpt" included); return it."""
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return model


__all__ = [
    "DUMMY",
    "DUMMY_GPT_MODEL",
    "DUMMY_NORM",
    "FINAL_NORMS",
    "GPT",
    "GPT_MODEL",
    "LAYER_NORM",
    "MODELS",
    "MODEL_CLASSES",
    "MODEL_KINDS",
    "check_model",
]
