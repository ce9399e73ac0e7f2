"""Data: COCO-format datasets (pycocotools) and a synthetic-shapes generator that writes them."""
from .coco import CocoDataset, collate
from .synthetic import SHAPES, draw_scene, shapes_image_dir, write_shapes_dataset

__all__ = ["CocoDataset", "collate", "draw_scene", "write_shapes_dataset", "shapes_image_dir", "SHAPES"]
