"""The files the twins read and write, one module per format.

- `canonical`: the canonical checkpoint (safetensors, its config in the metadata); `save_checkpoint`.
- `hf`: GPT-2 in HF transformers' layout, mapped onto the canonical one and back; `save_hf`.
- `hf_config`: what HF's `config.json` means, read as transformers reads it, and written.
- `torch_save`: the book's `torch.save` files, read without running pickled code.
- `safetensors_io`: safetensors files and sharded snapshots, read lazily and written verified.
- `train_state`: a training run between two steps (weights, AdamW moments and step, the run's
  position), read by both twins; the book's `model_and_optimizer.pth` read as one.
- `atomic`: every output written beside its destination and renamed into place once whole.

`gpt_spec.checkpoint.load_checkpoint` reads any of them.
"""
