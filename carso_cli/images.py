"""Image files in and out: finding them, reading them as model inputs, writing captioned PNG grids.

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
from PIL import Image, ImageDraw, ImageFont, ImageOps

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
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
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


# ----------------------------------------------------------------------------------------------
# Reconstruction grids (``predict --save-reconstructions``)
# ----------------------------------------------------------------------------------------------

GRID_MIN_PX = 128  # every image is drawn at least this many pixels wide (32×32 inputs: 4×, nearest)
_FONT_PX = 13
_LINE_PX = 17
_GAP = 8
_RIGHT, _WRONG, _PLAIN = (0, 120, 0), (190, 0, 0), (0, 0, 0)


@dataclass
class Tile:
    """One image of the grid and its caption, one line per entry.

    ``marks[i]``: True draws line i green (the class it names is the true one), False red, None black.
    """

    pixels: torch.Tensor  # (C, H, W) in [0, 1]
    caption: list[str]
    marks: list[bool | None] = field(default_factory=list)


@dataclass
class Grid:
    path: Path
    scale: int  # each image pixel is a scale×scale block
    tile_px: int  # drawn image side, ≥ GRID_MIN_PX
    size: tuple[int, int]  # (width, height) of the PNG
    captions: list[list[list[str]]]  # row → tile → lines, as drawn
    boxes: list[list[tuple[int, int]]]  # row → tile → (left, top) of the drawn image


def caption_line(prefix: str, predicted: int, names: Sequence[str] | None, true: int | None) -> tuple[str, bool | None]:
    """("prefix: name", right?) for a predicted class; right is None when the true class is unknown."""
    from carso_cli.classnames import label

    return f"{prefix}{label(list(names) if names is not None else None, predicted)}", (
        None if true is None else predicted == true
    )


def reconstruction_rows(
    inputs: torch.Tensor,
    reconstructions: torch.Tensor,
    recon_classes: torch.Tensor,
    carso_classes: torch.Tensor,
    names: Sequence[str] | None,
    true: Sequence[int | None],
    attacked: torch.Tensor | None = None,
    classifier_clean: torch.Tensor | None = None,
    classifier_attacked: torch.Tensor | None = None,
    attack_title: str = "attacked",
) -> list[list[Tile]]:
    """The grid's rows: per input, the input (and its attacked version), then its N reconstructions.

    Args:
        inputs: (B, C, H, W) in [0, 1], the clean inputs.
        reconstructions: (N, B, C, H, W) in [0, 1], of what CARSO classified (the attacked input if any).
        recon_classes: (N, B) the classifier's class for each reconstruction (what the aggregation combines).
        carso_classes: (B,) CARSO's prediction.
        true: per input, its true class or None (unknown).
        attacked / classifier_clean / classifier_attacked: with an attack, the attacked inputs (B, C, H, W)
            and the classifier's classes (B,) on the clean and the attacked input.
    """
    from carso_cli.classnames import label

    rows = []
    for b in range(inputs.shape[0]):
        t = true[b]
        truth = [f"true: {label(list(names) if names is not None else None, t)}"] if t is not None else []
        carso = caption_line("CARSO: ", int(carso_classes[b]), names, t)
        if attacked is None:
            first = Tile(inputs[b], ["input", *truth, carso[0]], [None] * (1 + len(truth)) + [carso[1]])
            row = [first]
        else:
            assert classifier_clean is not None and classifier_attacked is not None
            clean = caption_line("classifier: ", int(classifier_clean[b]), names, t)
            adv = caption_line("classifier: ", int(classifier_attacked[b]), names, t)
            row = [
                Tile(inputs[b], ["clean input", *truth, clean[0]], [None] * (1 + len(truth)) + [clean[1]]),
                Tile(attacked[b], [attack_title, adv[0], carso[0]], [None, adv[1], carso[1]]),
            ]
        for k in range(reconstructions.shape[0]):
            line = caption_line("→ ", int(recon_classes[k, b]), names, t)
            row.append(Tile(reconstructions[k, b], [f"reconstruction {k + 1}", line[0]], [None, line[1]]))
        rows.append(row)
    return rows


def _font(px: int = _FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib, a dependency: it has ε and →), else Pillow's own font."""
    try:
        from matplotlib import get_data_path

        return ImageFont.truetype(str(Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), px)
    except (ImportError, OSError):  # pragma: no cover - matplotlib's font missing, or no FreeType
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> str:
    """``text``, shortened with "…" until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _to_pil(pixels: torch.Tensor, scale: int) -> Image.Image:
    """(C, H, W) in [0, 1] → an RGB image, each pixel a scale×scale block (nearest: no invented detail)."""
    arr = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    img = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def save_grid(path: str | Path, rows: Sequence[Sequence[Tile]], title: str = "", min_px: int = GRID_MIN_PX) -> Grid:
    """Draw ``rows`` of captioned images into a PNG (written atomically): one input per row.

    Every image is upscaled by the smallest integer factor that makes it at least ``min_px`` wide
    (nearest neighbour); a column is as wide as its widest caption, up to twice the image.
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the image format of {path} from its suffix (use .png)")
    if not rows or not rows[0]:
        raise DataError("no image to draw")
    side = int(rows[0][0].pixels.shape[-1])
    scale = max(1, -(-min_px // side))  # ceil
    tile = side * scale
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    n_cols = max(len(r) for r in rows)
    widths = [tile] * n_cols
    for r in rows:
        for c, t in enumerate(r):
            for line in t.caption:
                widths[c] = min(max(widths[c], int(probe.textlength(line, font=font)) + 4), 2 * tile)
    lines = max(len(t.caption) for r in rows for t in r)
    row_h = tile + 4 + lines * _LINE_PX + _GAP
    width = sum(widths) + _GAP * (n_cols + 1)
    heading = _wrap(probe, title, font, width - 2 * _GAP) if title else []
    top = len(heading) * _LINE_PX + _GAP
    size = (width, top + row_h * len(rows))
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(heading):
        draw.text((_GAP, _GAP // 2 + j * _LINE_PX), line, fill=_PLAIN, font=font)
    captions: list[list[list[str]]] = []
    boxes: list[list[tuple[int, int]]] = []
    for i, r in enumerate(rows):
        y, x = top + i * row_h, _GAP
        drawn: list[list[str]] = []
        boxes.append([])
        for c, t in enumerate(r):
            boxes[-1].append((x + (widths[c] - tile) // 2, y))
            canvas.paste(_to_pil(t.pixels, scale), boxes[-1][-1])
            shown = []
            for j, line in enumerate(t.caption):
                text = _fit(draw, line, font, widths[c])
                mark = t.marks[j] if j < len(t.marks) else None
                colour = _PLAIN if mark is None else (_RIGHT if mark else _WRONG)
                draw.text((x, y + tile + 4 + j * _LINE_PX), text, fill=colour, font=font)
                shown.append(text)
            drawn.append(shown)
            x += widths[c] + _GAP
        captions.append(drawn)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format=fmt)
    return Grid(path, scale, tile, size, captions, boxes)
