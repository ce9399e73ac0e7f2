"""The network input is mmdetection's, bit for bit (issue 12).

Every expected tensor here is written from mmdetection 3.3's definitions, not from
solo_fast's code: ``LoadImageFromFile`` = ``cv2.imdecode(buf, cv2.IMREAD_COLOR)`` (BGR);
``Resize(keep_ratio=True)`` = ``mmcv.imrescale``: scale = min(long / max(h, w), short /
min(h, w)), size ``int(w * s + 0.5), int(h * s + 0.5)``, ``cv2.resize(INTER_LINEAR)`` on the
uint8 image; the data preprocessor: BGR -> RGB, ``(x - mean) / std`` in fp32, zero padding
bottom/right to a multiple of 32; in training ``BitmapMasks.rescale`` (``INTER_NEAREST``
per mask) and ``RandomFlip`` after the resize.
"""
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import solo_fast
from solo_fast.modeling.postprocess import postprocess

MMDET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)  # RGB, as in every SOLO config
MMDET_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
MIN, MAX = 64, 96  # the test scale (short, long)
GRIDS = (6, 5, 4, 3, 2)


def mmdet_size(h, w, short=MIN, long=MAX):
    s = min(long / max(h, w), short / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def mmdet_input(rgb: np.ndarray, short=MIN, long=MAX) -> torch.Tensor:
    """[1, 3, H, W] network input of one HWC uint8 RGB image (mmdetection's BGR image with
    its channels swapped: the resize treats channels alike)."""
    h, w = mmdet_size(*rgb.shape[:2], short, long)
    r = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    x = (torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1).float() - MMDET_MEAN) / MMDET_STD
    H, W = -(-h // 32) * 32, -(-w // 32) * 32
    return torch.nn.functional.pad(x, (0, W - w, 0, H - h))[None]


def cv2_decode_rgb(path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def picture(h, w, seed=0) -> np.ndarray:
    """Gradients, noise and a few flat shapes: edges and smooth parts for the resize."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.float64)
    img += rs.randn(h, w, 3) * 20
    img[h // 4: h // 2, w // 5: w // 2] = (250, 20, 40)
    img[(yy - 3 * h // 4) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 5) ** 2] = (10, 200, 90)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=2, min_size=MIN, max_size=MAX, num_grids=GRIDS).eval()
    with torch.no_grad():  # detections to compare, not the 0.01 prior everywhere
        m.mask_head.conv_cls.bias.normal_(0.0, 1.0)
    return m


def network_input(model, image) -> torch.Tensor:
    """What entered the backbone while ``predict`` ran on ``image``."""
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        result = model.predict(image, score_thr=0.05)[0]
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], result


# Odd sizes, a small image upscaled, an image already at the test scale, a large one.
SIZES = [(37, 53), (64, 96), (97, 61), (250, 180)]


def _write(kind, rgb, path):
    """Writes ``rgb`` as ``kind``; returns (path, the image the user sees as RGB)."""
    if kind == "png":
        Image.fromarray(rgb).save(path)
    elif kind == "jpeg":
        Image.fromarray(rgb).save(path, quality=90)
    elif kind == "exif_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
        Image.fromarray(rgb).save(path, quality=90, exif=exif)
    elif kind == "gray_png":
        Image.fromarray(rgb[:, :, 1]).save(path)
    elif kind == "rgba_png":
        alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :].repeat(rgb.shape[0], 0)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    elif kind == "palette_png":
        Image.fromarray(rgb).quantize(colors=37).save(path)
    elif kind == "png16":
        # High byte the red channel, low byte the blue one: 8 bits are the high byte (>> 8), not a rounding.
        cv2.imwrite(str(path), rgb[:, :, 0].astype(np.uint16) * 256 + rgb[:, :, 2])
    return path


FILE_KINDS = ["png", "jpeg", "exif_jpeg", "gray_png", "rgba_png", "palette_png", "png16"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_input_is_mmdetection_input(model, tmp_path, kind, size):
    rgb = picture(*size, seed=size[0])
    path = _write(kind, rgb, tmp_path / f"img.{'jpg' if 'jpeg' in kind else 'png'}")
    seen = cv2_decode_rgb(path)  # what mmdetection loads: EXIF applied, gray to 3 channels, 16 -> 8 bits
    if kind == "exif_jpeg":
        assert seen.shape[:2] == size[::-1]
    x, result = network_input(model, str(path))
    assert torch.equal(x, mmdet_input(seen))
    # Masks and the result's image are at the size the user sees (after EXIF orientation).
    assert result.masks.shape[1:] == seen.shape[:2] and np.array_equal(result.image, seen)


def test_decoding_facts(tmp_path):
    """What the cv2 decode above does (so that the expectations mean what they say)."""
    rgb = picture(20, 30)
    gray = cv2_decode_rgb(_write("gray_png", rgb, tmp_path / "g.png"))
    assert (gray == rgb[:, :, 1:2]).all()
    rgba = cv2_decode_rgb(_write("rgba_png", rgb, tmp_path / "a.png"))
    assert np.array_equal(rgba, rgb)  # alpha dropped, not composited
    deep = cv2_decode_rgb(_write("png16", rgb, tmp_path / "d.png"))
    assert np.array_equal(deep[:, :, 0], rgb[:, :, 0])  # (v * 256 + low) >> 8


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_array_pil_and_tensor_inputs_are_mmdetection_input(model, size):
    rgb = picture(*size, seed=1)
    expected = mmdet_input(rgb)
    for image in (rgb, Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1),
                  np.ascontiguousarray(rgb[::-1])[::-1]):  # a negative-stride view too
        x, result = network_input(model, image)
        assert torch.equal(x, expected), type(image)
        assert result.masks.shape[1:] == size
    # The caller's array is read only.
    frozen = rgb.copy()
    frozen.setflags(write=False)
    assert torch.equal(network_input(model, frozen)[0], expected)


def test_pil_16bit_and_palette_images_equal_their_files(model, tmp_path):
    rgb = picture(45, 70)
    for kind in ("png16", "palette_png", "gray_png"):
        path = _write(kind, rgb, tmp_path / f"{kind}.png")
        with Image.open(path) as im:
            assert im.mode in ("I;16", "I", "P", "L"), im.mode
            x_pil = network_input(model, im)[0]
        assert torch.equal(x_pil, mmdet_input(cv2_decode_rgb(path))), kind


def test_float_tensor_path(model):
    """Float tensors take F.interpolate on their device: equal to the uint8 path when no
    resize is needed (k / 255 * 255 == k in fp32), within a grey level or so otherwise."""
    rgb = picture(64, 96)
    x_float = network_input(model, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)[0]
    assert torch.equal(x_float, mmdet_input(rgb))
    rgb = picture(97, 61)
    x_float = network_input(model, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)[0]
    diff = ((x_float - mmdet_input(rgb)) * MMDET_STD).abs()  # in grey levels
    assert 0 < float(diff.max()) <= 1.5


def test_predict_on_a_file_equals_the_network_on_mmdetection_input(model, tmp_path):
    rgb = picture(83, 117, seed=5)
    path = _write("jpeg", rgb, tmp_path / "x.jpg")
    seen = cv2_decode_rgb(path)
    result = model.predict(str(path), score_thr=0.05)[0]
    assert len(result) > 0
    x = mmdet_input(seen)
    h, w = mmdet_size(*seen.shape[:2])
    meta = solo_fast.modeling.transform.ImageMeta(seen.shape[:2], (h, w), tuple(x.shape[-2:]))
    with torch.no_grad():
        expected = postprocess(model.mask_head, model.extract(x), [meta], model.inference_settings(score_thr=0.05),
                               model.cfg["strides"])[0]
    assert torch.equal(result.scores, expected["scores"]) and torch.equal(result.labels, expected["labels"])
    assert torch.equal(result.masks, expected["masks"])


def test_batched_uint8_inputs_pad_like_mmdetection(model):
    a, b = picture(37, 53), picture(97, 61, seed=2)
    batch, metas = model.transform([a, b])
    xa, xb = mmdet_input(a)[0], mmdet_input(b)[0]
    H, W = max(xa.shape[1], xb.shape[1]), max(xa.shape[2], xb.shape[2])
    expected = torch.stack([torch.nn.functional.pad(x, (0, W - x.shape[2], 0, H - x.shape[1])) for x in (xa, xb)])
    assert torch.equal(batch, expected)
    assert [m.img_shape for m in metas] == [mmdet_size(37, 53), mmdet_size(97, 61)]


# ----------------------------------------------------------------------------- training


def mmdet_train(rgb, masks, short, long, flip):
    """mmdetection's train pipeline for one image at a drawn scale and flip: Resize of image
    (INTER_LINEAR) and masks (INTER_NEAREST each), then RandomFlip; then normalisation."""
    h, w = mmdet_size(*rgb.shape[:2], short, long)
    img = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    ms = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in masks])
    if flip:
        img, ms = img[:, ::-1], ms[:, :, ::-1]
    x = (torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() - MMDET_MEAN) / MMDET_STD
    return x, torch.from_numpy(np.ascontiguousarray(ms))


def train_scene(h, w, seed=0):
    rs = np.random.RandomState(seed)
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 3: h // 2, 2: w // 3] = 1
    masks[1][(rs.rand(h, w) > 0.6)] = 1  # speckle: every resampling choice shows
    masks[2, h // 3:, w // 2:] = 1
    return picture(h, w, seed), masks


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("size", [(61, 97), (120, 77)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_training_input_and_masks_are_mmdetection_train_pipeline(size, flip):
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, min_size=MIN, max_size=MAX, num_grids=GRIDS,
                           train_min_size=(48,), flip_prob=1.0 if flip else 0.0)
    rgb, masks = train_scene(*size)
    for image in (rgb, torch.from_numpy(rgb).permute(2, 0, 1)):
        batch, metas, out_masks = model.transform([image], [torch.from_numpy(masks)], training=True)
        x, m = mmdet_train(rgb, masks, 48, MAX, flip)
        h, w = x.shape[-2:]
        assert metas[0].img_shape == (h, w) and batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
        assert torch.equal(batch[0, :, :h, :w], x) and not batch[0, :, h:].any() and not batch[0, :, :, w:].any()
        assert torch.equal(out_masks[0][:, :h, :w], m) and not out_masks[0][:, h:].any()


def test_training_draws_every_published_scale_and_both_flips():
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, num_grids=GRIDS)
    tf = model.transform
    assert tf.train_min_size == (512, 480, 448, 416, 384, 352) and tf.max_size == 768 and tf.min_size == 448
    rgb, masks = train_scene(150, 200)
    expected = {(s, f): mmdet_train(rgb, masks, s, 768, f) for s in tf.train_min_size for f in (False, True)}
    random.seed(0)
    drawn = []
    for _ in range(100):
        batch, metas, out_masks = tf([rgb], [torch.from_numpy(masks)], training=True)
        h, w = metas[0].img_shape
        hits = [k for k, (x, m) in expected.items()
                if x.shape[-2:] == (h, w) and torch.equal(batch[0, :, :h, :w], x) and torch.equal(out_masks[0][:, :h, :w], m)]
        assert len(hits) == 1, (h, w)  # every draw is one of mmdetection's (scale, flip) outcomes
        drawn += hits
    assert set(drawn) == set(expected)


@pytest.mark.parametrize("name,short,long,train", [
    ("solo_r50_fpn", 800, 1333, (800, 768, 736, 704, 672, 640)),
    ("decoupled_solo_r50_fpn", 800, 1333, (800, 768, 736, 704, 672, 640)),
    ("solov2_r101_fpn", 800, 1333, (800, 768, 736, 704, 672, 640)),
    ("decoupled_solo_light_r50_fpn", 512, 852, (512, 480, 448, 416, 384, 352)),
    ("solov2_light_r34_fpn", 448, 768, (512, 480, 448, 416, 384, 352)),
])
def test_named_configs_carry_the_published_scales(name, short, long, train):
    # mmdetection 3.3 configs/solo/*_3x_coco.py, configs/solov2/*_ms-3x_coco.py: RandomChoiceResize
    # scales and the test pipeline's Resize scale.
    cfg = solo_fast.modeling.configs.get_config(name)
    assert (cfg["min_size"], cfg["max_size"], cfg["train_min_size"], cfg["flip_prob"]) == (short, long, train, 0.5)
    # A test scale of one's own trains at that scale unless training scales are given.
    assert solo_fast.modeling.configs.get_config(name, min_size=300)["train_min_size"] == (300,)
    assert solo_fast.modeling.configs.get_config(name, min_size=300, train_min_size=[320, 288])["train_min_size"] == (320, 288)
    for bad in (dict(train_min_size=()), dict(train_min_size=(0,)), dict(flip_prob=1.5), dict(min_size=(800, 640))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            solo_fast.modeling.configs.get_config(name, **bad)
