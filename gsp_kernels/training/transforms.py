"""The papers' torchvision transforms of the image datasets.

- ``train_transform(image_size=227)``: random-resized crop, flip, ImageNet normalization.
- ``test_transform(resize=256, crop=227)``: shorter side resized, centre crop, normalization.
- ``papers_resize(crop)``: the test-time shorter side for a crop (256/227 of it).
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int = 227):
    """The papers' training augmentation (torchvision): random-resized crop to ``image_size``
    (scale 0.16-1, aspect 3/4-4/3), horizontal flip, ImageNet normalization.
    PIL image -> ``[3, image_size, image_size]`` float32."""
    from torchvision import transforms

    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_transform(resize: int = 256, crop: int = 227):
    """The papers' test preprocessing (torchvision): shorter side resized to ``resize``, centre
    crop of ``crop``, ImageNet normalization. PIL image -> ``[3, crop, crop]`` float32."""
    from torchvision import transforms

    if not 1 <= crop <= resize:
        raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


test_transform.__test__ = False  # a transform, not a pytest test, when imported into a test module


def papers_resize(crop: int) -> int:
    """The papers' test-time shorter side for a centre crop of ``crop``: 256/227 of it, rounded."""
    return round(crop * 256 / 227)
