"""hstu-exp: Hydra-configured experiments for GPU inference of HSTU."""

__version__ = "0.1.0"
