"""What a GPT is, framework-free: the config schema, the GPT-2 tokenizer, the canonical state dict.

What a user needs, importable from here:

- `GPTConfig`: the book's config, typed and checked (`GPTConfig.preset("gpt2-small")`,
  `GPTConfig.from_dict(GPT_CONFIG_124M)`); `PRESETS`: the published GPT-2 sizes by name.
- `get_tokenizer`: GPT-2's BPE, built offline from hash-checked files.
- `ModelClass`, `ModelKind`: the models both twins build, by class name ("GPTModel") and by
  short name ("gpt"); `FinalNorm`: DummyGPTModel's final norm. Each member equals its string.
- `StateDict`: the canonical state dict, `{name: numpy array}` in the torch twin's names.
- `Checkpoint`, `load_checkpoint`: any checkpoint the twins read (canonical, HF GPT-2, `.pth`),
  checked before a tensor is read; `save_checkpoint`: the canonical file; `save_hf`: an HF
  GPT-2 snapshot folder.
- `from_hf`, `to_hf`: a state dict in HF GPT-2's layout to the canonical one and back.

The rest lives in its own module: the twins' shared checks in `gpt_spec.checks`, names and
shapes in `gpt_spec.layout`, the file formats in `gpt_spec.formats`, state dicts in
`gpt_spec.tensors` (the other seed's skeleton layout in `gpt_spec.skeleton`), sizes and memory
in `gpt_spec.limits`, stage names in `gpt_spec.stages`, chapter 5's data and training in
`gpt_spec.data` and `gpt_spec.training`, parity randomness in `gpt_spec.randomness`, FLOP counts
in `gpt_spec.flops`.
"""

from .checkpoint import Checkpoint, load_checkpoint
from .config import PRESETS, GPTConfig
from .formats.canonical import save_checkpoint
from .formats.hf import from_hf, save_hf, to_hf
from .models import FinalNorm, ModelClass, ModelKind
from .tensors import StateDict
from .tokenizer import get_tokenizer

__all__ = [
    "PRESETS",
    "Checkpoint",
    "FinalNorm",
    "GPTConfig",
    "ModelClass",
    "ModelKind",
    "StateDict",
    "from_hf",
    "get_tokenizer",
    "load_checkpoint",
    "save_checkpoint",
    "save_hf",
    "to_hf",
]
