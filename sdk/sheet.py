"""Contact sheets: each query image beside its hits, one row a query, drawn with Pillow."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

THUMB = 96


def _thumb(path: str | os.PathLike | None):
    """A THUMB x THUMB thumbnail of an image file, or a grey tile where the file is gone or unreadable."""
    from PIL import Image

    if path is None:
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    try:
        img = Image.open(path).convert("RGB")
        img.thumbnail((THUMB, THUMB))
    except (OSError, TypeError, ValueError):
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    tile = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return tile


def contact_sheet(queries: Sequence[str | os.PathLike | None], hits: Sequence[Sequence[dict[str, Any]]],
                  out: str | os.PathLike, *, lead: str = "query") -> Path:
    """Write a PNG: row i is query i (captioned `lead`), a gap, then its hits (found by their metadata "path")
    captioned with the Hamming distance and cosine score where they have them."""
    from PIL import Image, ImageDraw

    cols = 1 + max((len(h) for h in hits), default=0)
    cell_w, cell_h, gap = THUMB + 8, THUMB + 22, 16
    sheet = Image.new("RGB", (cols * cell_w + gap, max(1, len(queries)) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (query, row_hits) in enumerate(zip(queries, hits)):
        y = row * cell_h
        sheet.paste(_thumb(query), (4, y + 4))
        draw.text((4, y + THUMB + 6), lead, fill=(0, 0, 0))
        for j, hit in enumerate(row_hits):
            x = (j + 1) * cell_w + gap
            meta = hit.get("metadata")
            sheet.paste(_thumb(meta.get("path") if isinstance(meta, dict) else None), (x, y + 4))
            distance = f"d{hit['distance']} " if "distance" in hit else ""
            score = "" if hit.get("score") is None else f"{hit['score']:.3f}"
            draw.text((x, y + THUMB + 6), f"{distance}{score}", fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
