"""Image encoders and their preprocessing: each encoder says what its weights expect (open_clip's
preprocess_cfg, timm's data config), the transform matches the library's own eval transform, the
`preprocess` recorded in existing lav2.json files gives the same tensors as before, and the
open_clip encoder's tokens are the ViT's last block after ln_post and the projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lav2cli.errors import Lav2Error
from lav2cli.model.vision import ImagePreprocess, OpenClipEncoder, TimmEncoder

DEMO_META = Path(__file__).resolve().parents[1] / "lav2cli" / "assets" / "demo" / "lav2.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def image():
    """A non-square picture, so that resizing and cropping both matter."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (200, 300, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return OpenClipEncoder("ViT-B-32", None)


def old_transform(size: int, mean, std, bgr: bool = False):
    """The transform every artifact so far was made with: short side to `size` (bicubic), centre
    crop, optional channel flip, normalise."""
    from torchvision import transforms as T

    steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()]
    if bgr:
        steps.append(T.Lambda(lambda t: t.flip(0)))
    return T.Compose([*steps, T.Normalize(mean, std)])


# -- preprocessing from the encoder's configuration ---------------------------------------------


def test_timm_efficientnet_lite0_preprocessing_is_timms_eval_transform_without_its_crop(image):
    from timm.data import create_transform, resolve_model_data_config

    enc = TimmEncoder("efficientnet_lite0", None)
    pre = ImagePreprocess.for_encoder(enc)
    # size, mean/std and interpolation from timm's configuration; the whole image (no eval crop)
    assert pre == ImagePreprocess(224, IMAGENET_MEAN, IMAGENET_STD, "rgb", "bicubic", "shortest", 1.0)
    assert enc.image_size == 224
    ours = pre.transform()(image)
    theirs = create_transform(**{**resolve_model_data_config(enc.net), "crop_pct": 1.0})(image)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, old_transform(224, IMAGENET_MEAN, IMAGENET_STD)(image))
    assert "crop_pct" not in pre.to_dict() and ImagePreprocess.from_dict(pre.to_dict()) == pre
    cropped = ImagePreprocess(224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875)
    assert cropped.to_dict()["crop_pct"] == 0.875 and ImagePreprocess.from_dict(cropped.to_dict()) == cropped


def test_open_clip_vit_b32_preprocessing_is_open_clips_eval_transform(vit_b32, image):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pre = ImagePreprocess.for_encoder(vit_b32)
    assert pre == ImagePreprocess(224, OPENAI_MEAN, OPENAI_STD)
    # recorded exactly as before: no new keys for the preprocessing earlier artifacts used
    assert pre.to_dict() == {"size": 224, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "channel_order": "rgb"}
    cfg = open_clip.get_model_preprocess_cfg(vit_b32)  # kept on the visual tower
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image)
    torch.testing.assert_close(pre.transform()(image), theirs)
    assert ImagePreprocess.for_encoder(vit_b32, "bgr").channel_order == "bgr"


def test_open_clip_model_of_another_size():
    torch.manual_seed(0)
    enc = OpenClipEncoder("ViT-B-32-256", None)
    pre = enc.preprocess_config()
    assert pre.size == enc.image_size == 256 and pre.mean == OPENAI_MEAN
    assert enc(torch.zeros(1, 3, 256, 256)).shape == (1, 1 + 8 * 8, 512)


# -- what existing lav2.json files record --------------------------------------------------------


@pytest.mark.parametrize("channel_order", ["rgb", "bgr"])
def test_recorded_preprocess_gives_the_same_tensors_as_before(image, channel_order):
    recorded = {**json.loads(DEMO_META.read_text())["preprocess"], "channel_order": channel_order}
    pre = ImagePreprocess.from_dict(recorded)
    assert pre.to_dict() == recorded
    before = old_transform(224, recorded["mean"], recorded["std"], bgr=channel_order == "bgr")(image)
    assert torch.equal(pre.transform()(image), before)


def test_bad_recorded_preprocess_is_one_line():
    base = {"size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for bad, words in (({"resize_mode": "longest"}, "resize mode 'longest'"),
                       ({"channel_order": "rbg"}, "channel order 'rbg'"),
                       ({"crop_pct": 1.5}, "crop fraction 1.5")):
        with pytest.raises(Lav2Error, match=words) as e:
            ImagePreprocess.from_dict({**base, **bad})
        assert "\n" not in str(e.value)


# -- the open_clip encoder's tokens ---------------------------------------------------------------


def reference_tokens(visual, pixels: torch.Tensor) -> torch.Tensor:
    """Every token spelled out from the ViT's parts: patch embedding, CLS, positions, ln_pre, the
    blocks, ln_post on all tokens, then the projection."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    x = visual.ln_post(visual.transformer(x))
    return x @ visual.proj


def test_open_clip_tokens_are_cls_and_patches_after_ln_post_and_proj(vit_b32):
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = vit_b32(pixels)
    assert tokens.shape == (2, 1 + 7 * 7, 512) and vit_b32.out_dim == 512
    with torch.no_grad():
        expected = reference_tokens(vit_b32.visual, pixels)
        pooled = vit_b32.visual(pixels)  # open_clip's own image embedding is the CLS token's
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-4, atol=1e-5)
