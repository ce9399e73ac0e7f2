"""The e2e benchmark's comparison of the fast path's detections with the reference's."""
import importlib.util
import os

import torch

_spec = importlib.util.spec_from_file_location(
    "latency", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "latency.py"))
latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency)


def _result(n=3, h=5, w=7):
    g = torch.Generator().manual_seed(0)
    return {"masks": torch.rand(n, h, w, generator=g) > 0.5, "scores": torch.linspace(0.9, 0.5, n),
            "labels": torch.arange(n)}


def test_identical_outputs_agree_exactly():
    a = latency.output_agreement([_result()], [_result()])
    assert a == {"detections": [3, 3], "labels_equal": True, "max_score_diff": 0.0,
                 "mask_pixels_differing": 0, "mask_pixels": 3 * 5 * 7}
    assert latency.describe_agreement(a).startswith("same 3 labels")


def test_differences_are_counted():
    fast = _result()
    fast["masks"][1, 2, 3] = ~fast["masks"][1, 2, 3]
    fast["masks"][2, 0, 0] = ~fast["masks"][2, 0, 0]
    fast["scores"] = fast["scores"].clone()
    fast["scores"][2] += 1e-3
    a = latency.output_agreement([_result()], [fast])
    assert a["labels_equal"] and a["mask_pixels_differing"] == 2
    assert abs(a["max_score_diff"] - 1e-3) < 1e-6


def test_other_labels_or_counts_are_reported():
    fast = _result()
    fast["labels"] = torch.tensor([0, 2, 1])
    assert not latency.output_agreement([_result()], [fast])["labels_equal"]
    short = {k: v[:2] for k, v in _result().items()}
    a = latency.output_agreement([_result()], [short])
    assert a["detections"] == [3, 2] and not a["labels_equal"] and a["mask_pixels"] == 2 * 5 * 7
    assert "DIFFER" in latency.describe_agreement(a)
    assert latency.output_agreement([_result(0)], [_result(0)])["max_score_diff"] == 0.0
