"""Pictures of per-token temperatures: a generated text with each token shaded by the temperature it was
sampled at (TempNet's tau or the Adaptive Decoder's choice), as HTML and as a PNG (Pillow).

Colours: a blue (cold) -> pale yellow -> red (hot) scale between vmin and vmax (default: the range of the
temperatures shown; the temperature set's range is a better choice when comparing pictures). Prompt tokens,
which were not sampled, have a temperature of None and are drawn grey. A legend shows the scale.

    render_html(tokens, temps, "out.html");  render_png(tokens, temps, "out.png")
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .lm import AdaptiveError

# RdYlBu, reversed: (position, RGB)
STOPS = [(0.0, (49, 54, 149)), (0.25, (116, 173, 209)), (0.5, (255, 255, 191)), (0.75, (244, 109, 67)),
         (1.0, (165, 0, 38))]
PROMPT_COLOUR = (225, 225, 225)
BACKGROUND = (255, 255, 255)


def colour(value: float) -> Tuple[int, int, int]:
    """RGB of a position in [0, 1] on the scale (clamped)."""
    x = min(max(float(value), 0.0), 1.0)
    for (p0, c0), (p1, c1) in zip(STOPS, STOPS[1:]):
        if x <= p1:
            f = (x - p0) / (p1 - p0)
            return tuple(int(round(a + (b - a) * f)) for a, b in zip(c0, c1))
    return STOPS[-1][1]


def text_colour(bg: Tuple[int, int, int]) -> Tuple[int, int, int]:
    lum = (0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]) / 255
    return (0, 0, 0) if lum > 0.5 else (255, 255, 255)


def hex_colour(rgb: Tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


@dataclass
class Shading:
    tokens: List[str]
    temps: List[Optional[float]]
    vmin: float
    vmax: float

    def position(self, t: float) -> float:
        return 0.5 if self.vmax <= self.vmin else (t - self.vmin) / (self.vmax - self.vmin)

    def background(self, i: int) -> Tuple[int, int, int]:
        t = self.temps[i]
        return PROMPT_COLOUR if t is None else colour(self.position(t))


def prepare(tokens: Sequence[str], temps: Sequence[Optional[float]], vmin: Optional[float] = None,
            vmax: Optional[float] = None) -> Shading:
    """Check the inputs and fix the colour range."""
    tokens, temps = list(tokens), list(temps)
    if len(tokens) == 0:
        raise AdaptiveError("there are no tokens to shade; pass a non-empty text")
    if len(tokens) != len(temps):
        raise AdaptiveError(f"{len(tokens)} tokens but {len(temps)} temperatures; give one temperature per token "
                            "(null for prompt tokens)")
    for i, t in enumerate(temps):
        if t is not None and (not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise AdaptiveError(f"temperature {t!r} of token {i} ({tokens[i]!r}) is not a finite number; "
                                "use a number, or null for a token that was not sampled")
    shown = [float(t) for t in temps if t is not None]
    lo = min(shown) if vmin is None and shown else (0.0 if vmin is None else float(vmin))
    hi = max(shown) if vmax is None and shown else (1.0 if vmax is None else float(vmax))
    if hi < lo:
        raise AdaptiveError(f"--vmax {hi} is below --vmin {lo}; pass vmin <= vmax")
    return Shading(tokens, [None if t is None else float(t) for t in temps], lo, hi)


def piece_text(piece: str) -> str:
    """How a tokenizer piece is shown: sentencepiece's word marker becomes a space, a byte piece its character
    when it is printable ASCII, a newline or a tab (other bytes, parts of a UTF-8 character, stay <0xNN>)."""
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        try:
            b = int(piece[3:5], 16)
        except ValueError:
            return piece
        return chr(b) if 0x20 <= b < 0x7F or b in (0x09, 0x0A) else piece
    return piece.replace("\u2581", " ")


def token_strings(tokenizer, ids: Sequence[int]) -> List[str]:
    """Display strings of token ids (piece_text of each piece)."""
    return [piece_text(tokenizer.id_to_piece(int(i))) for i in ids]


# -- HTML ------------------------------------------------------------------------------------------------------


def _html_token(text: str) -> str:
    escaped = html.escape(text)
    return escaped.replace("\n", "\u21b5<br>").replace("  ", " &nbsp;") or "&#8203;"


def render_html(tokens: Sequence[str], temps: Sequence[Optional[float]], path: Optional[str] = None, *,
                vmin: Optional[float] = None, vmax: Optional[float] = None, title: str = "Temperature per token",
                separator: str = "") -> str:
    """A self-contained HTML page: one <span class="tok" data-tau=...> per token, and a legend. Written to
    `path` when given; returns the HTML."""
    s = prepare(tokens, temps, vmin, vmax)
    spans = []
    for i, (tok, t) in enumerate(zip(s.tokens, s.temps)):
        bg = s.background(i)
        tip = "prompt" if t is None else f"tau = {t:.3f}"
        tau_attr = "" if t is None else f"{t:.6g}"
        spans.append(f'<span class="tok{" prompt" if t is None else ""}" data-index="{i}" data-tau="{tau_attr}" '
                     f'title="{tip}" style="background:{hex_colour(bg)};color:{hex_colour(text_colour(bg))}">'
                     f'{_html_token(tok)}</span>')
    gradient = ", ".join(f"{hex_colour(c)} {int(p * 100)}%" for p, c in STOPS)
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.text {{ font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap; }}
.tok {{ padding: 2px 1px; border-radius: 3px; }}
.legend {{ margin-top: 1.5em; font-size: 13px; }}
.bar {{ display: inline-block; width: 240px; height: 12px; vertical-align: middle; margin: 0 0.5em;
        background: linear-gradient(to right, {gradient}); }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<div class="text">{separator.join(spans)}</div>
<div class="legend">temperature <span class="vmin">{s.vmin:.3g}</span><span class="bar"></span><span class="vmax">{s.vmax:.3g}</span>
 &nbsp; <span style="background:{hex_colour(PROMPT_COLOUR)}">&nbsp;prompt&nbsp;</span> &nbsp; (hover a token for its value)</div>
</body></html>
"""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(doc)
    return doc


# -- PNG -------------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSansMono.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


@dataclass
class Box:
    index: int
    x0: int
    y0: int
    x1: int
    y1: int


def render_png(tokens: Sequence[str], temps: Sequence[Optional[float]], path: Optional[str] = None, *,
               vmin: Optional[float] = None, vmax: Optional[float] = None, width: int = 800, font_size: int = 16,
               title: Optional[str] = "Temperature per token", separator: str = ""):
    """Draw the shaded text wrapped to `width` pixels, with a legend. Returns (PIL image, boxes): one box per
    token, more for a token with newlines (Box.index is the token's index)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise AdaptiveError("PNG output needs Pillow: `pip install Pillow`, or write only the HTML") from None
    s = prepare(tokens, temps, vmin, vmax)
    if width < 200:
        raise AdaptiveError(f"--width {width} is too narrow for the picture; use at least 200 pixels")
    font = _font(font_size)
    small = _font(max(10, font_size - 4))
    margin, pad, line_h = 16, 2, font_size + 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(t: str, f=font) -> int:
        return int(math.ceil(measure.textlength(t, font=f))) if t else 0

    # layout: tokens flow left to right; a newline inside a token (shown as a return arrow) starts a new line,
    # so a token may have several boxes
    boxes: List[Box] = []
    labels: List[str] = []
    x, y = margin, margin + (line_h + 4 if title else 0)
    right = width - margin
    for i, tok in enumerate(s.tokens):
        parts = (tok + separator).replace("\t", "    ").split("\n")
        for j, part in enumerate(parts):
            label = part + ("\u21b5" if j < len(parts) - 1 else "")
            if not label and j > 0:
                continue  # nothing after the token's last newline
            w = max(text_w(label), 4) + 2 * pad
            if x + w > right and x > margin:
                x, y = margin, y + line_h
            w = min(w, right - margin)
            boxes.append(Box(i, x, y, x + w, y + line_h - 4))
            labels.append(label)
            x += w + 1
            if j < len(parts) - 1:
                x, y = margin, y + line_h
    text_bottom = (boxes[-1].y1 if boxes else y) + 12
    legend_h = 40
    height = text_bottom + legend_h + margin
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((margin, margin), title, fill=(0, 0, 0), font=font)
    for b, label in zip(boxes, labels):
        bg = s.background(b.index)
        draw.rectangle([b.x0, b.y0, b.x1 - 1, b.y1 - 1], fill=bg)
        draw.text((b.x0 + pad, b.y0 + 1), label, fill=text_colour(bg), font=font)
    # legend: the colour bar between vmin and vmax, and the prompt swatch
    bar_x0, bar_y0 = margin + 100, text_bottom + 10
    bar_w, bar_h = min(300, width - bar_x0 - 120), 14
    draw.text((margin, bar_y0 - 1), "temperature", fill=(0, 0, 0), font=small)
    for i in range(bar_w):
        draw.line([bar_x0 + i, bar_y0, bar_x0 + i, bar_y0 + bar_h - 1], fill=colour(i / max(bar_w - 1, 1)))
    draw.text((bar_x0, bar_y0 + bar_h + 1), f"{s.vmin:.3g}", fill=(0, 0, 0), font=small)
    vmax_txt = f"{s.vmax:.3g}"
    draw.text((bar_x0 + bar_w - text_w(vmax_txt, small), bar_y0 + bar_h + 1), vmax_txt, fill=(0, 0, 0), font=small)
    sw_x = bar_x0 + bar_w + 20
    draw.rectangle([sw_x, bar_y0, sw_x + 14, bar_y0 + bar_h - 1], fill=PROMPT_COLOUR, outline=(160, 160, 160))
    draw.text((sw_x + 20, bar_y0 - 1), "prompt", fill=(0, 0, 0), font=small)
    if path:
        img.save(path)
    return img, boxes
