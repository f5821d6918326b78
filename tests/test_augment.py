"""data_prep/augment.py: the diffusion noise has the variance its schedule implies; every PIL augmentation keeps size
and mode, changes the image, and is a pure function of its rng."""

import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_prep"))
import augment  # noqa: E402


def _image(mode="RGB", size=(40, 32), seed=0):
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------- diffusion
def test_schedule_matches_seva_numbers():
    abar = augment.noise_schedule()
    assert abar.shape == (1000,)
    assert abar[500].sqrt().item() == pytest.approx(0.863, abs=1e-3)
    assert abar[800].sqrt().item() == pytest.approx(0.467, abs=1e-3)
    assert bool((abar[1:] < abar[:-1]).all())  # noise only grows


@pytest.mark.parametrize("t", [500, 800])
def test_diffusion_noise_variance_and_mean(t):
    abar = augment.noise_schedule()[t].item()
    g = torch.Generator().manual_seed(0)
    zero = augment.diffusion_noise(torch.zeros(32, 3, 32, 32), t, g)  # ~98k draws of sqrt(1 - abar) eps
    assert zero.mean().item() == pytest.approx(0.0, abs=0.01)
    assert zero.var().item() == pytest.approx(1 - abar, rel=0.02)
    x0 = torch.full((32, 3, 32, 32), 1.5)
    noisy = augment.diffusion_noise(x0, t, g)
    assert noisy.mean().item() == pytest.approx(abar ** 0.5 * 1.5, abs=0.01)
    assert noisy.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_diffusion_noise_seeded_and_keeps_dtype():
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def run(seed):
        return augment.diffusion_noise(x0, 500, torch.Generator().manual_seed(seed))

    a = run(0)
    assert a.dtype == torch.bfloat16 and a.shape == x0.shape
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    assert not torch.equal(a, x0)
    with pytest.raises(ValueError, match="t must be"):
        augment.diffusion_noise(x0, 1000, torch.Generator())


# ---------------------------------------------------------------------------------------------- PIL views
@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_augmentation_keeps_size_and_mode(name, mode):
    image = _image(mode)
    out = augment.AUGMENTATIONS[name](image, random.Random(0))
    assert (out.size, out.mode) == (image.size, image.mode)


@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
def test_every_augmentation_is_seeded(name):
    image, op = _image(), augment.AUGMENTATIONS[name]
    outs = [op(image, random.Random(s)) for s in (0, 0, 1, 2, 3)]
    assert _same(outs[0], outs[1])
    assert not all(_same(outs[0], o) for o in outs[2:])  # posterize/solarize are identity half the time
    assert _same(image, _image())  # the input is not changed in place


@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
def test_every_augmentation_changes_the_image(name):
    image, op = _image(), augment.AUGMENTATIONS[name]
    assert any(not _same(op(image, random.Random(s)), image) for s in range(8))


def test_moco_changes_the_image_every_time():
    image = _image()
    assert all(not _same(augment.AUGMENTATIONS["moco"](image, random.Random(s)), image) for s in range(8))


def test_identity_settings_are_identities():
    image, rng = _image(), random.Random(0)
    assert _same(augment.color_jitter(image, rng, 0, 0, 0, 0), image)
    assert _same(augment.random_resized_crop(image, rng, scale=(1, 1), ratio=(1.25, 1.25)), image)  # 40 x 32
    assert _same(augment.posterize(image, rng, p=0.0), image)
    assert _same(augment.solarize(image, rng, threshold=256, p=1.0), image)


def test_single_operations_by_hand():
    image, rng = _image(), random.Random(0)
    solar = np.asarray(augment.solarize(image, rng, p=1.0)).astype(int)
    src = np.asarray(image).astype(int)
    assert np.array_equal(solar, np.where(src >= 128, 255 - src, src))
    poster = np.asarray(augment.posterize(image, rng, p=1.0))
    assert set(np.unique(poster)) <= {0, 64, 128, 192}
    grey = augment.random_grayscale(image, rng, p=1.0)
    r, g, b = grey.split()
    assert _same(r, g) and _same(g, b)
    flipped = augment.horizontal_flip(image, rng, p=1.0)
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
    crop = augment.random_resized_crop(image, rng, size=(16, 16))
    assert crop.size == (16, 16)


def test_space_tells_where_an_augmentation_acts():
    assert augment.space("diffusion") == "pixels"
    assert all(augment.space(n) == "image" for n in augment.AUGMENTATIONS)
    with pytest.raises(KeyError, match="moco"):
        augment.space("nope")


def test_preview_cli(tmp_path):
    path = tmp_path / "in.png"
    _image().save(path)
    written = augment.main([str(path), "--out", str(tmp_path / "out"), "--t", "500"])
    assert len(written) == len(augment.AUGMENTATIONS) + 1
    assert all(Image.open(p).size == (40, 32) for p in written)
