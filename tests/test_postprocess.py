"""Inference post-processing on hand-built head outputs whose answer is known by construction."""
import math

import pytest
import torch

from solo_fast.modeling import get_config
from solo_fast.modeling.configs import InferenceSettings
from solo_fast.ops.reference import mask_stats
from solo_fast.modeling.postprocess import flat_scores, point_nms, postprocess_image
from solo_fast.modeling.transform import ImageMeta


class FakeHead:
    """A head whose candidate soft masks are given per (level, cell)."""

    def __init__(self, num_grids, masks_by_cell):
        self.num_grids = list(num_grids)
        self.masks_by_cell = masks_by_cell  # {(level, cell): [h, w] soft mask}

    def candidate_masks(self, out, b, cells, mask_size, mask_thr, static=False):
        starts = [0]
        for S in self.num_grids:
            starts.append(starts[-1] + S * S)
        level_cell = []
        for c in cells.tolist():  # flat cells over all levels -> (level, cell in the level)
            level = max(i for i in range(len(self.num_grids)) if starts[i] <= c)
            level_cell.append((level, c - starts[level]))
        soft = torch.stack([self.masks_by_cell[lc] for lc in level_cell])
        assert soft.shape[1:] == mask_size
        return mask_stats(soft, mask_thr)


GRIDS = (4, 3, 2, 2, 1)
PAD = (64, 64)  # masks at stride 4: 16 x 16


def run(scores_by_cell, masks_by_cell, kernel="gaussian", sigma=2.0, **cfg_kw):
    cfg = get_config("solov2_r18_fpn", num_grids=GRIDS)
    cfg.update(num_classes=3, nms_kernel=kernel, nms_sigma=sigma, **cfg_kw)
    settings = InferenceSettings.from_config(cfg)
    total = sum(s * s for s in GRIDS)
    offsets = [0]
    for s in GRIDS:
        offsets.append(offsets[-1] + s * s)
    scores = torch.zeros(total, 3)
    for (level, cell, label), s in scores_by_cell.items():
        scores[offsets[level] + cell, label] = s
    meta = ImageMeta(ori_shape=PAD, img_shape=PAD, pad_shape=PAD)
    return postprocess_image(FakeHead(GRIDS, masks_by_cell), None, 0, scores, meta, settings, cfg["strides"])


def box_mask(y0, y1, x0, x1, value=0.9):
    m = torch.zeros(16, 16)
    m[y0:y1, x0:x1] = value
    return m


def test_identical_same_class_masks_gaussian_and_linear():
    m = box_mask(2, 10, 2, 10)
    masks = {(0, 1): m, (0, 6): m.clone()}
    scores = {(0, 1, 0): 0.8, (0, 6, 0): 0.6}
    out = run(scores, masks, filter_thr=0.0)
    # maskness of a constant 0.9 mask is 0.9; the lower one decays by exp(-sigma * 1**2).
    torch.testing.assert_close(out["scores"], torch.tensor([0.8 * 0.9, 0.6 * 0.9 * math.exp(-2.0)]))
    out = run(scores, masks, kernel="linear", filter_thr=0.0)
    torch.testing.assert_close(out["scores"], torch.tensor([0.8 * 0.9, 0.0]))
    # With the default filter_thr (0.05) the fully decayed duplicate disappears.
    out = run(scores, masks, kernel="linear")
    assert out["scores"].shape == (1,)


def test_different_classes_do_not_decay():
    m = box_mask(2, 10, 2, 10)
    out = run({(0, 1, 0): 0.8, (0, 6, 2): 0.6}, {(0, 1): m, (0, 6): m.clone()})
    torch.testing.assert_close(out["scores"], torch.tensor([0.8 * 0.9, 0.6 * 0.9]))
    assert out["labels"].tolist() == [0, 2]
    assert out["masks"].shape == (2, 64, 64) and out["masks"].dtype == torch.bool
    # The 16x16 stride-4 box [2:10) maps to [8:40) on the 64x64 image.
    assert bool(out["masks"][0, 9:39, 9:39].all()) and not bool(out["masks"][0, 45:, :].any())


def test_mask_not_larger_than_its_stride_is_dropped():
    # Level 0 has stride 8: an area of exactly 8 pixels is dropped, 9 is kept.
    small, ok = torch.zeros(16, 16), torch.zeros(16, 16)
    small[0, :8] = 0.9
    ok[5, :9] = 0.9
    out = run({(0, 0, 1): 0.9, (0, 5, 1): 0.5}, {(0, 0): small, (0, 5): ok}, filter_thr=0.0)
    assert out["scores"].shape == (1,)
    torch.testing.assert_close(out["scores"], torch.tensor([0.5 * 0.9]))
    # Level 3 has stride 32: a 20-pixel mask is dropped there.
    mid = box_mask(0, 4, 0, 5)
    out = run({(3, 0, 0): 0.9}, {(3, 0): mid})
    assert out["scores"].numel() == 0 and out["masks"].shape == (0, 64, 64)


def test_maskness_and_score_threshold():
    m = torch.zeros(16, 16)
    m[0:4, 0:4] = 0.6
    m[4:8, 0:4] = 1.0
    m[8:12, 0:4] = 0.3  # below mask_thr: outside the binary mask, not counted
    out = run({(0, 2, 1): 0.5, (0, 3, 1): 0.09}, {(0, 2): m, (0, 3): box_mask(0, 8, 8, 16)})
    # maskness = mean soft value inside the binary mask = (0.6 + 1.0) / 2; cell 3 is below score_thr.
    torch.testing.assert_close(out["scores"], torch.tensor([0.5 * 0.8]))


def test_point_nms_keeps_local_maxima_only():
    p = torch.tensor([[[[0.1, 0.5, 0.2], [0.3, 0.4, 0.9], [0.6, 0.2, 0.1]]]])
    kept = point_nms(p)[0, 0]
    # A score survives when it equals the max of the 2x2 window ending at it (pad 1 top/left).
    expected = torch.tensor([[0.1, 0.5, 0.0], [0.3, 0.0, 0.9], [0.6, 0.0, 0.0]])
    torch.testing.assert_close(kept, expected)
    assert flat_scores([torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)]).shape == (2, 20, 3)


@pytest.mark.parametrize("max_per_img", [1, 2])
def test_max_per_img(max_per_img):
    masks = {(0, c): box_mask(c, c + 4, 0, 16) for c in range(3)}
    out = run({(0, 0, 0): 0.9, (0, 1, 1): 0.8, (0, 2, 2): 0.7}, masks, max_per_img=max_per_img)
    assert out["labels"].tolist() == [0, 1, 2][:max_per_img]


def test_two_pass_chunks_give_the_same_answer():
    # Many overlapping candidates over two levels, ties in score included.
    g = torch.Generator().manual_seed(0)
    masks, scores = {}, {}
    for level, S in ((0, 4), (1, 3)):
        for cell in range(S * S):
            y0, x0 = torch.randint(0, 8, (2,), generator=g).tolist()
            masks[(level, cell)] = box_mask(y0, y0 + 6, x0, x0 + 7, value=0.6 + 0.1 * (cell % 3))
            for label in range(3):
                scores[(level, cell, label)] = round(float(torch.rand(1, generator=g)), 1)
    full = run(scores, masks, nms_pre=10, max_per_img=8)
    for chunk in (1, 5, 7):
        chunked = run(scores, masks, nms_pre=10, max_per_img=8, mask_chunk=chunk)
        assert torch.equal(chunked["labels"], full["labels"])
        torch.testing.assert_close(chunked["scores"], full["scores"], rtol=0, atol=0)
        assert torch.equal(chunked["masks"], full["masks"])
    assert len(full["scores"]) == 8


def test_per_level_joins_levels_in_order():
    from solo_fast.modeling.heads import per_level

    levels = torch.tensor([0, 0, 2, 2, 2])
    cells = torch.tensor([1, 3, 0, 5, 7])
    seen = []

    def fn(lvl, sel):
        seen.append((lvl, sel.tolist()))
        return torch.stack([sel * 10 + lvl, sel]).t().float(), sel.float()

    rows, second = per_level(levels, cells, 3, fn, (torch.zeros(0, 2), torch.zeros(0)))
    assert seen == [(0, [1, 3]), (1, []), (2, [0, 5, 7])]
    assert rows.tolist() == [[10, 1], [30, 3], [2, 0], [52, 5], [72, 7]] and second.tolist() == [1, 3, 0, 5, 7]
    empty = torch.zeros(0, 2)
    assert per_level(levels[:0], cells[:0], 3, lambda lvl, sel: sel[:, None].float().expand(-1, 2), empty) is empty
    with pytest.raises(ValueError, match="levels"):
        per_level(torch.tensor([2, 0]), torch.tensor([5, 1]), 3, fn, empty)


def test_one_cell_two_classes_shares_its_mask():
    m = box_mask(1, 9, 3, 12)
    calls = []

    class CountingHead(FakeHead):
        def candidate_masks(self, out, b, cells, mask_size, mask_thr, static=False):
            calls.append(cells.tolist())
            return super().candidate_masks(out, b, cells, mask_size, mask_thr)

    cfg_scores = {(0, 5, 0): 0.7, (0, 5, 2): 0.6}
    cfg = get_config("solov2_r18_fpn", num_grids=GRIDS)
    cfg.update(num_classes=3)
    scores = torch.zeros(sum(s * s for s in GRIDS), 3)
    for (_, cell, label), s in cfg_scores.items():
        scores[cell, label] = s
    meta = ImageMeta(ori_shape=PAD, img_shape=PAD, pad_shape=PAD)
    out = postprocess_image(CountingHead(GRIDS, {(0, 5): m}), None, 0, scores, meta,
                            InferenceSettings.from_config(cfg), cfg["strides"])
    assert calls == [[5]]  # the mask of cell 5 is computed once for both classes
    assert out["labels"].tolist() == [0, 2]
    torch.testing.assert_close(out["scores"], torch.tensor([0.7 * 0.9, 0.6 * 0.9]))
    assert torch.equal(out["masks"][0], out["masks"][1])


@pytest.mark.parametrize("pad,img,ori", [((64, 96), (64, 96), (64, 96)),  # no crop, no resize
                                         ((64, 96), (61, 90), (61, 90)),  # crop only
                                         ((64, 96), (61, 90), (37, 55)),  # crop, then resize down
                                         ((32, 32), (29, 31), (71, 80))])  # crop, then resize up
@pytest.mark.parametrize("budget", [1, 3 * 64 * 96, 1 << 21])  # one mask, 3 masks, all at once
def test_final_masks_equal_one_resize_of_all_masks(pad, img, ori, budget, monkeypatch):
    from solo_fast.modeling import postprocess

    g = torch.Generator().manual_seed(1)
    soft = torch.rand(7, pad[0] // 4, pad[1] // 4, generator=g)
    soft[2] = 0.5  # ties with the threshold everywhere
    # The published formulation: every mask resized in one call, cropped, resized, thresholded.
    full = torch.nn.functional.interpolate(soft[None], size=pad, mode="bilinear", align_corners=False)
    full = full[:, :, : img[0], : img[1]]
    if img != ori:
        full = torch.nn.functional.interpolate(full, size=ori, mode="bilinear", align_corners=False)
    monkeypatch.setattr(postprocess, "RESIZE_CHUNK_ELEMS", budget)
    got = postprocess.final_masks(soft, pad, img, ori, 0.5)
    assert got.dtype == torch.bool and got.shape == (7, *ori)
    assert torch.equal(got, full[0] > 0.5)
    assert postprocess.final_masks(soft[:0], pad, img, ori, 0.5).shape == (0, *ori)
