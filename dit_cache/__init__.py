"""dit-cache: learned feature caching for diffusers diffusion transformers."""

from .embedded import embedded_model_path, embedded_router_path

__version__ = "0.1.0"

__all__ = ["embedded_model_path", "embedded_router_path"]
