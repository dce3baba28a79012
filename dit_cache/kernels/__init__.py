"""Custom kernels (Triton where available, plain-torch references otherwise)."""

from .cross_token_nms import cross_token_nms, cross_token_nms_reference

__all__ = ["cross_token_nms", "cross_token_nms_reference"]
