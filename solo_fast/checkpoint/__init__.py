"""Reading weights written by other code bases into a :class:`solo_fast.SOLO`.

``mmdet``: mmdetection 2.x/3.x and original-SOLO checkpoints (``SOLO.from_mmdet``), and the
file reading every loader shares (``read_state_dict``: ``torch.load(weights_only=True)`` or
safetensors). ``backbone``: ImageNet ResNets (``SOLO(..., backbone_weights=PATH)``).
``init``: a detector checkpoint into a model for other classes (``SOLO.finetune_from``).
"""
