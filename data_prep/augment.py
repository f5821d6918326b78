"""SeVa's image augmentations as pure functions: forward-diffusion noise on pixel tensors, and PIL-level views
(MoCo v2, BYOL, SimCLR lists and single operations), with all randomness passed in.

    python data_prep/augment.py photo.jpg --out previews/ [--seed 0 --t 500 800]   # one PNG per augmentation

Used by ``data_prep/seva_pairs.py`` (``--augment NAME``). SeVa (Zhu et al., arXiv 2404.10501,
https://github.com/Kevinz-code/SeVa) answers each prompt on the clean image (chosen) and on an augmented one
(rejected). Augmentations act in one of two spaces, and a caller picks by table:

    AUGMENTATIONS        name -> op(image: PIL.Image, rng: random.Random) -> PIL.Image
                         applied to the PIL image *before* the image processor
    PIXEL_AUGMENTATIONS  name -> op(pixel_values: Tensor (..., 3, H, W), t: int, generator: torch.Generator)
                         applied to the processed, CLIP-normalised tensor *after* the image processor
                         (only "diffusion")

``space(name)`` says which ("image" or "pixels"). Every op is deterministic given its ``rng`` / ``generator``.

Diffusion noise (SeVa's and POVID's ``add_diffusion_noise``; DDPM forward process, Ho et al. 2020)::

    betas_t = sigmoid(linspace(-6, 6, 1000))_t * (5e-3 - 1e-5) + 1e-5        t = 0 .. 999
    abar_t  = prod_{s <= t} (1 - betas_s)
    x_t     = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, I)

``t`` indexes the schedule from 0, as SeVa's ``noise_step`` does: t = 500 gives sqrt(abar) = 0.863 (noise std
0.505), t = 800 gives 0.467 (noise std 0.884); SeVa's two released models used these two steps.

PIL views, as SeVa's ``augmentation_function`` built them with torchvision (re-implemented here with PIL/numpy):

    moco     RandomResizedCrop(scale 0.2-1), HorizontalFlip(p 0.5), ColorJitter(0.4, 0.4, 0.4, 0.1),
             RandomGrayscale(p 0.2), GaussianBlur(sigma ~ U[0.1, 2.0])
    byol     the same with crop scale 0.08-1
    simclr   RandomResizedCrop(scale 0.2-1), HorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(p 0.2)
    crop     RandomResizedCrop(scale 0.36-0.64)
    rotate   RandomRotation(0-180 degrees), nearest neighbour, black corners, same canvas
    posterize  2 bits, p 0.5;  solarize  threshold 128, p 0.5

Where this differs from MoCo v2 / BYOL / SimCLR themselves, it follows SeVa: colour jitter and blur are applied
with p = 1 (MoCo v2 uses p = 0.8 and 0.5); SeVa's "byol" list has no solarization (BYOL's second view has it with
p = 0.2); posterize and solarize keep torchvision's default p = 0.5, so about half the "augmented" images are the
clean ones and give identical answers, which SeVa's filter drops. One deliberate difference: crops are resized
back to the image's own size, not to SeVa's 224 px (the image processor resizes to its input size afterwards);
pass ``size=(224, 224)`` to ``random_resized_crop`` to match SeVa exactly.
"""

from __future__ import annotations

import argparse
import math
import os
import random
from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ImageOp = Callable[[Image.Image, random.Random], Image.Image]
PixelOp = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]

NUM_STEPS = 1000


# ------------------------------------------------------------------------------------------- diffusion noise
def noise_schedule(num_steps: int = NUM_STEPS) -> torch.Tensor:
    """``abar`` of SeVa's sigmoid schedule, shape ``(num_steps,)``, float64: ``abar[t] = prod_{s<=t} (1 - beta_s)``."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def diffusion_noise(pixel_values: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for the processed pixels ``x_0`` of shape ``(..., 3, H, W)``.

    ``eps`` is drawn on ``generator``'s device (so the result depends only on the generator's seed) and moved to
    the pixels' device; the result has the pixels' dtype and device.
    """
    if not 0 <= t < NUM_STEPS:
        raise ValueError(f"t must be in [0, {NUM_STEPS - 1}], got {t}")
    abar = noise_schedule()[t].item()
    eps = torch.randn(pixel_values.shape, generator=generator, device=generator.device, dtype=torch.float32)
    x_t = math.sqrt(abar) * pixel_values.float() + math.sqrt(1 - abar) * eps.to(pixel_values.device)
    return x_t.to(pixel_values.dtype)


# ---------------------------------------------------------------------------------------------- PIL operations
def random_resized_crop(image: Image.Image, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        size: Optional[tuple[int, int]] = None) -> Image.Image:
    """A crop of random area (fraction ``scale`` of the image) and aspect ratio (log-uniform in ``ratio``), resized
    bilinearly to ``size`` (width, height; default the image's own size). torchvision's sampling: 10 tries, then
    a centre crop clamped to ``ratio``."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            w, h = round(height * max(ratio)), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize(size or image.size, Image.BILINEAR, box=(left, top, left + w, top + h))


def horizontal_flip(image: Image.Image, rng: random.Random, p: float = 0.5) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < p else image


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue by ``factor`` of a turn (-0.5..0.5), in 8-bit HSV with wrap-around (torchvision's PIL path)."""
    h, s, v = image.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int16) + int(factor * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1) -> Image.Image:
    """Brightness, contrast and saturation factors ~ U[1 - x, 1 + x], hue shift ~ U[-hue, hue], in random order.

    Brightness blends with black, contrast with the mean grey level, saturation with the greyscale image. A
    strength of 0 skips its operation, as torchvision does (the HSV round trip of the hue shift is lossy).
    """
    def factor(x):
        return rng.uniform(max(0.0, 1 - x), 1 + x)

    ops = [lambda im, f=factor(brightness): ImageEnhance.Brightness(im).enhance(f),
           lambda im, f=factor(contrast): ImageEnhance.Contrast(im).enhance(f),
           lambda im, f=factor(saturation): ImageEnhance.Color(im).enhance(f),
           lambda im, f=rng.uniform(-hue, hue): _adjust_hue(im, f)]
    ops = [op for op, x in zip(ops, (brightness, contrast, saturation, hue)) if x > 0]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def random_grayscale(image: Image.Image, rng: random.Random, p: float = 0.2) -> Image.Image:
    """With probability ``p``, the greyscale image (ITU-R 601 luma) with its three channels kept."""
    return image.convert("L").convert("RGB") if rng.random() < p else image


def gaussian_blur(image: Image.Image, rng: random.Random, sigma: tuple[float, float] = (0.1, 2.0)) -> Image.Image:
    """PIL's Gaussian blur with ``sigma ~ U[sigma]`` (the SimCLR / MoCo v2 operator SeVa copied)."""
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*sigma)))


def rotate(image: Image.Image, rng: random.Random, degrees: tuple[float, float] = (0.0, 180.0)) -> Image.Image:
    """Rotate counter-clockwise by ``U[degrees]`` about the centre; same canvas, black corners, nearest neighbour."""
    return image.rotate(rng.uniform(*degrees), resample=Image.NEAREST, expand=False, fillcolor=0)


def posterize(image: Image.Image, rng: random.Random, bits: int = 2, p: float = 0.5) -> Image.Image:
    """With probability ``p``, keep only the top ``bits`` bits of every channel."""
    return ImageOps.posterize(image, bits) if rng.random() < p else image


def solarize(image: Image.Image, rng: random.Random, threshold: int = 128, p: float = 0.5) -> Image.Image:
    """With probability ``p``, invert every channel value at or above ``threshold``."""
    return ImageOps.solarize(image, threshold) if rng.random() < p else image


def compose(*ops: ImageOp) -> ImageOp:
    """Apply ``ops`` in order, each drawing from the same ``rng``; works on any mode via RGB and back."""
    def apply(image: Image.Image, rng: random.Random) -> Image.Image:
        mode = image.mode
        out = image if mode == "RGB" else image.convert("RGB")
        for op in ops:
            out = op(out, rng)
        return out if mode == "RGB" else out.convert(mode)

    return apply


# ---------------------------------------------------------------------------------------------------- tables
AUGMENTATIONS: dict[str, ImageOp] = {
    "moco": compose(partial(random_resized_crop, scale=(0.2, 1.0)), horizontal_flip, color_jitter,
                    random_grayscale, gaussian_blur),
    "byol": compose(partial(random_resized_crop, scale=(0.08, 1.0)), horizontal_flip, color_jitter,
                    random_grayscale, gaussian_blur),
    "simclr": compose(partial(random_resized_crop, scale=(0.2, 1.0)), horizontal_flip,
                      partial(color_jitter, hue=0.4), random_grayscale),
    "crop": compose(partial(random_resized_crop, scale=(0.36, 0.64))),
    "rotate": compose(rotate),
    "posterize": compose(posterize),
    "solarize": compose(solarize),
}

PIXEL_AUGMENTATIONS: dict[str, PixelOp] = {"diffusion": diffusion_noise}


def space(name: str) -> str:
    """``"image"`` for a PIL-level augmentation (before the processor), ``"pixels"`` for a tensor-level one."""
    if name in AUGMENTATIONS:
        return "image"
    if name in PIXEL_AUGMENTATIONS:
        return "pixels"
    raise KeyError(f"unknown augmentation {name!r}: one of {sorted(AUGMENTATIONS) + sorted(PIXEL_AUGMENTATIONS)}")


# ----------------------------------------------------------------------------------------------------- preview
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preview_diffusion(image: Image.Image, t: int, generator: torch.Generator) -> Image.Image:
    """What the model sees after diffusion noise: CLIP-normalise, add noise at step ``t``, undo, clip to 0-255."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    noisy = diffusion_noise((x - mean) / std, t, generator) * std + mean
    return Image.fromarray((noisy.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="an image file to augment")
    p.add_argument("--out", required=True, help="directory for <name>.png previews")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t", type=int, nargs="+", default=[500, 800], help="diffusion steps to preview")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    image = Image.open(args.image).convert("RGB")
    written = []
    for name, op in AUGMENTATIONS.items():
        written.append(os.path.join(args.out, f"{name}.png"))
        op(image, random.Random(args.seed)).save(written[-1])
    for t in args.t:
        written.append(os.path.join(args.out, f"diffusion{t}.png"))
        preview_diffusion(image, t, torch.Generator().manual_seed(args.seed)).save(written[-1])
    print("\n".join(written))
    return written


if __name__ == "__main__":
    main()
