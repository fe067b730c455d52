"""Genfusion: object-detector training sets from a few real images plus diffusion models."""

__version__ = "0.1.0"
