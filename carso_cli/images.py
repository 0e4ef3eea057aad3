"""Image files in and out: finding them, reading them as model inputs, writing PNG grids.

Inputs are brought to what the model expects — ``channels`` (RGB or grayscale) and a square
``size``×``size`` — and every change is reported as a note, so the user knows what the model saw:
alpha is composited onto white, grayscale/palette/16-bit images are converted, EXIF rotations are
applied, a non-square image is centre-cropped to a square, and other sizes are resized (bicubic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from carso_cli.checkpoint import atomic_path
from carso_cli.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

_MODE_NAMES = {
    "1": "black-and-white",
    "L": "grayscale",
    "P": "palette",
    "I": "32-bit grayscale",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "F": "floating-point grayscale",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "RGB": "RGB",
}


@dataclass
class InputImage:
    path: Path
    pixels: torch.Tensor  # (C, size, size) uint8
    notes: list[str] = field(default_factory=list)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the images inside folders (recursively, sorted; hidden entries skipped).

    A path that does not exist, or a folder holding no image, is a DataError.
    """
    if not inputs:
        raise DataError("no image given: pass image files or folders of images")
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not images:
                raise DataError(f"{path} is a folder without images (looked for {', '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
        elif path.is_file():
            found.append(path)  # any name: PIL decides from the content whether it is an image
        elif path.exists():
            raise DataError(f"{path} is neither a file nor a folder")
        else:
            raise DataError(f"no such file or folder: {path}")
    return found


def _to_mode(img: Image.Image, target: str, notes: list[str]) -> Image.Image:
    """``img`` in mode ``target`` ("RGB" or "L"); transparency is composited onto white."""
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        # PIL's own I→L conversion clips at 255 (a 16-bit image would come out nearly white): rescale.
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr / scale * 255), 0, 255).astype(np.uint8), mode="L")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
        notes.append(f"converted {mode} to {target} (transparent areas on white)")
    elif mode != target:
        notes.append(f"converted {_MODE_NAMES.get(mode, mode)} to {target}")
    return img.convert(target) if img.mode != target else img


def load_image(path: str | Path, size: int, channels: int = 3) -> InputImage:
    """Read ``path`` as a (channels, size, size) uint8 tensor for the model, noting every change made."""
    path = Path(path)
    target = {3: "RGB", 1: "L"}.get(channels)
    if target is None:
        raise DataError(f"models with {channels} input channels cannot read image files (1 or 3 only)")
    notes: list[str] = []
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, inside this try
            img = ImageOps.exif_transpose(opened)  # a copy, rotated as phone photos' EXIF says
            img = _to_mode(img, target, notes)
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL reports unknown formats and truncated or damaged files with these.
        raise DataError(f"cannot read {path} as an image: {err}") from None
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        notes.append(f"centre-cropped {w}×{h} to {side}×{side}")
    if img.size != (size, size):
        notes.append(f"resized {img.size[0]}×{img.size[1]} to {size}×{size}")
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    from torchvision.transforms.functional import pil_to_tensor  # lazy: torchvision adds seconds to CLI start

    return InputImage(path, pil_to_tensor(img), notes)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (…, C, H, W) → float32 in [0, 1] (the models' input range)."""
    return pixels.float() / 255.0


def save_grid(path: str | Path, images: torch.Tensor, reconstructions: torch.Tensor, padding: int = 2) -> Path:
    """Write a grid: one row per input, the input first, then its N reconstructions.

    Args:
        images: (B, C, H, W) in [0, 1].
        reconstructions: (N, B, C, H, W) in [0, 1].
    Returns:
        The path written; the file is ((N+1)·(W+p)+p) × (B·(H+p)+p) pixels for padding p.
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the image format of {path} from its suffix (use .png)")
    n = reconstructions.shape[0]
    rows = torch.cat([images.unsqueeze(0), reconstructions], dim=0)  # (1+N, B, C, H, W)
    tiles = rows.transpose(0, 1).reshape(-1, *images.shape[1:])  # input b, then its reconstructions
    from torchvision.utils import save_image  # lazy: torchvision adds seconds to every CLI start

    with atomic_path(path) as tmp:
        save_image(tiles.detach().float().cpu(), tmp, nrow=n + 1, padding=padding, pad_value=1.0, format=fmt)
    return path
