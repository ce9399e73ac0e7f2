"""Reading weights written by other code bases into a :class:`solo_fast.SOLO`.

``mmdet``: mmdetection 2.x/3.x and original-SOLO checkpoints (``SOLO.from_mmdet``).
"""
