"""Data: synthetic scenes (and, later, COCO datasets)."""
from .synthetic import draw_scene

__all__ = ["draw_scene"]
