"""A contact sheet of misclassified images, with Pillow only: one section per scored file, each image a
thumbnail captioned with its true and predicted label and the predicted label's score.

    sheet = contact_sheet([("model.onnx: 12 of 350 misclassified", rows, 0)], limits=ImageLimits())
    sheet.save("misclassified.png")

`rows` are dicts with "path", "true", "predicted" and "score", already in the order to show.
"""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from edgexfer.runtime.errors import ImageError
from edgexfer.runtime.preprocess import ImageLimits, load_image, to_8bit

THUMB = 128      # thumbnail side, pixels
COLUMNS = 8
PAD = 6
CAPTION_LINES = 2
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
WRONG = (180, 20, 20)
MUTED = (110, 110, 110)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with '..' until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def _thumbnail(path: str, limits: ImageLimits | None) -> Image.Image:
    """The image fitted into THUMB x THUMB on a grey square; a grey square with a cross if it cannot be read."""
    tile = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    try:
        img = to_8bit(load_image(path, limits))
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
        tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    except (ImageError, OSError, ValueError):
        d = ImageDraw.Draw(tile)
        d.line((0, 0, THUMB, THUMB), fill=MUTED)
        d.line((0, THUMB, THUMB, 0), fill=MUTED)
    return tile


def contact_sheet(sections: list[tuple[str, list[dict], int]], *, limits: ImageLimits | None = None,
                  columns: int = COLUMNS) -> Image.Image:
    """One PNG-ready image: for each (title, rows, not_shown) a title line, a grid of captioned thumbnails
    and, when `not_shown` > 0, a line saying how many more there are."""
    font, title_font = _font(11), _font(14)
    line_h, title_h = 14, 22
    cell_w, cell_h = THUMB + PAD, THUMB + CAPTION_LINES * line_h + PAD
    width = PAD + columns * cell_w
    heights = []
    for _, rows, not_shown in sections:
        grid_rows = -(-len(rows) // columns)
        heights.append(title_h + grid_rows * cell_h + (line_h + PAD if not_shown or not rows else 0) + PAD)
    sheet = Image.new("RGB", (width, max(1, sum(heights))), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (title, rows, not_shown), h in zip(sections, heights):
        draw.text((PAD, y + 4), _fit(draw, title, title_font, width - 2 * PAD), fill=INK, font=title_font)
        top = y + title_h
        for i, r in enumerate(rows):
            x0, y0 = PAD + (i % columns) * cell_w, top + (i // columns) * cell_h
            sheet.paste(_thumbnail(r["path"], limits), (x0, y0))
            score = "n/a" if r.get("score") is None else f"{r['score']:.2f}"
            draw.text((x0, y0 + THUMB + 1), _fit(draw, f"{r['true']} -> {r['predicted']}", font, THUMB),
                      fill=WRONG, font=font)
            draw.text((x0, y0 + THUMB + 1 + line_h), _fit(draw, f"score {score}", font, THUMB), fill=MUTED,
                      font=font)
        foot = top + -(-len(rows) // columns) * cell_h
        if not rows:
            draw.text((PAD, foot), "no misclassified images", fill=MUTED, font=font)
        elif not_shown:
            draw.text((PAD, foot), f"... and {not_shown} more, not shown (all are in misclassified.csv)",
                      fill=MUTED, font=font)
        y += h
    return sheet
