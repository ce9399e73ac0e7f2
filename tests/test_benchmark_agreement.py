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
                 "mask_pixels_differing": 0, "mask_pixels": 3 * 5 * 7,
                 "moved": 0, "matched_max_score_diff": 0.0, "matched_min_iou": 1.0}
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


def test_detections_that_trade_places_are_matched_by_mask():
    ref = _result(4, 6, 6)
    for i in range(4):  # four distinct masks
        ref["masks"][i] = False
        ref["masks"][i, i, :] = True
    fast = {k: v.clone() for k, v in ref.items()}
    fast["masks"][[1, 2]] = ref["masks"][[2, 1]]
    fast["scores"][[1, 2]] = ref["scores"][[2, 1]]
    fast["labels"][[1, 2]] = ref["labels"][[2, 1]]
    a = latency.output_agreement([ref], [fast])
    assert a["moved"] == 2 and a["matched_max_score_diff"] == 0.0 and a["matched_min_iou"] == 1.0
    assert not a["labels_equal"] and a["max_score_diff"] > 0.1 and a["mask_pixels_differing"] == 4 * 6
    assert "2 at another position" in latency.describe_agreement(a)
    assert latency.output_agreement([ref], [ref])["moved"] == 0


def test_matrix_nms_cost_model():
    c = latency.matrix_nms_cost(500, 200, 336)
    assert c["ops"] == 2 * 124_750 * 67_200 and c["bytes"] == 500 * 67_200 + 12 * 500 * 500
    # H100 SXM: 3.35 TB/s and 1979 dense int8 TOPS -> memory-bound, ~11 us.
    case = {"flops": c["ops"], "bytes": c["bytes"], "precision": "int8"}
    assert 10 < latency.floor_ms(case, latency.GPU_PEAKS["H100"]) * 1e3 < 12
