"""Transforms of cached uint8 tensors: eval equals pipeline.preprocess; training augments reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_image
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import AugmentParams
from pipeline.data.cache import build_cache, cached_square
from pipeline.data.loader import CachedImages, EpochSampler
from pipeline.data.transforms import build_batch_mix, build_transforms
from pipeline.preprocess import preprocess

CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
}


def _image(width=45, height=38) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_eval_transform_of_the_cache_equals_the_shared_eval_preprocessing():
    img = _image()
    ours = build_transforms(CONFIG, AugmentParams(), train=False)(
        torch.from_numpy(cached_square(img, CONFIG))
    )
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), preprocess(img, CONFIG), atol=1e-6)


@pytest.mark.parametrize("auto_augment", ["none", "trivial", "randaugment"])
def test_train_transform_is_random_but_reproducible_from_the_seed(auto_augment):
    augment = AugmentParams(color_jitter=0.4, auto_augment=auto_augment, random_erasing=0.5)
    transform = build_transforms(CONFIG, augment, train=True)
    square = torch.from_numpy(cached_square(_image(), CONFIG))

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return transform(square)

    assert sample(1).shape == (3, 32, 32) and sample(1).dtype == torch.float32
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_batch_mix_gives_soft_targets_or_nothing_when_off():
    assert build_batch_mix(AugmentParams(), num_classes=3) is None
    mix = build_batch_mix(AugmentParams(mixup_alpha=0.4, cutmix_alpha=1.0), num_classes=3)
    images, targets = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 3)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_evaluation_batches_are_transformed_whole_with_the_images_one_by_one_give(tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", i % 3, size=40, seed=i) for i in range(7)]
    cache_file = build_cache(paths, [p.name for p in paths], CONFIG, tmp_path / "cache", workers=1)
    labels = np.arange(7) % 3
    transform = build_transforms(CONFIG, AugmentParams(), train=False)
    batched = CachedImages(cache_file, labels, transform, seed=0, random=False)
    one_by_one = CachedImages(cache_file, labels, transform, seed=0)

    batches = list(DataLoader(batched, batch_size=3, sampler=EpochSampler(labels, 0, shuffle=False)))

    assert [len(y) for _, y in batches] == [3, 3, 1]
    expected = torch.stack([one_by_one[(0, i)][0] for i in range(7)])
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    assert torch.cat([y for _, y in batches]).tolist() == labels.tolist()


@pytest.mark.parametrize("augment", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_batch_mix_mixes_two_images_and_weights_their_labels_by_the_same_lambda(augment):
    # Image k is flat with value k and has label k: a mixed image's pixels are its target-weighted labels.
    mix = build_batch_mix(AugmentParams(**augment), num_classes=4)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    labels = torch.arange(4)
    torch.manual_seed(3)
    mixed, targets = mix(images, labels)
    torch.manual_seed(3)
    assert torch.equal(mix(images, labels)[0], mixed)  # seeded: reproducible
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    for image, target, label in zip(mixed, targets, labels, strict=True):
        sources = target.nonzero().flatten().tolist()
        assert len(sources) == 2 and label in sources and 0.0 < target[label] < 1.0  # two images, mixed
        torch.testing.assert_close(image.mean(), (target * torch.arange(4.0)).sum())
        if "cutmix_alpha" in augment:  # a pasted box: every pixel is one of the two images'
            assert set(image.unique().tolist()) == {float(k) for k in sources}
