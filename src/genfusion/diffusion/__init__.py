"""Stable Diffusion without a hub: the builtin tiny model, local checkpoints, fine-tunes,
schedulers, and attention capture for automatic labels."""
