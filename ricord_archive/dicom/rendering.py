"""Rendering a frame for people: modality LUT, VOI window, scaling, JPEG or PNG. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from ricord_archive.errors import BadRequest, NotAcceptable

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: tuple[float, float, str] | None = None  # center, width, function
    viewport: tuple[int, int] | None = None  # width, height to fit into
    quality: int = 90


def _numbers(text: str, name: str, count: int) -> list[str]:
    parts = text.split(",")
    if len(parts) < count:
        raise BadRequest(f"{name}: expected {count} comma-separated values")
    return parts


def parse_options(params: dict[str, str], accepted: str) -> RenderOptions:
    """Options from `window`, `viewport`, `quality` query parameters and the chosen media type."""
    if accepted not in MEDIA_TYPES:
        raise NotAcceptable("rendered images are image/jpeg or image/png")
    window = viewport = None
    try:
        if params.get("window"):
            center, width, *function = _numbers(params["window"], "window", 2)
            window = (float(center), float(width), (function or ["linear"])[0].lower())
            if window[1] <= 0 or window[2] not in ("linear", "linear_exact", "sigmoid"):
                raise BadRequest("window: width must be positive, function linear or sigmoid")
        if params.get("viewport"):
            width, height, *_ = _numbers(params["viewport"], "viewport", 2)
            viewport = (int(width), int(height))
            if not (0 < viewport[0] <= 8192 and 0 < viewport[1] <= 8192):
                raise BadRequest("viewport: width and height must be between 1 and 8192")
        quality = int(params.get("quality") or 90)
    except ValueError as exc:
        raise BadRequest("window, viewport and quality take numbers") from exc
    if not 1 <= quality <= 100:
        raise BadRequest("quality must be between 1 and 100")
    return RenderOptions(accepted, window, viewport, quality)


def _first(value: Any) -> float:
    """The first of a multi-valued window attribute (several windows may be offered)."""
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _window(attributes: Dataset, options: RenderOptions) -> tuple[float, float, str] | None:
    """The requested window, else the header's first one, else None (full range)."""
    if options.window is not None:
        return options.window
    if "WindowCenter" in attributes and "WindowWidth" in attributes:
        try:
            function = str(attributes.get("VOILUTFunction", "LINEAR") or "LINEAR").lower()
            return _first(attributes.WindowCenter), _first(attributes.WindowWidth), function
        except (TypeError, ValueError):
            return None
    return None


def _to_eight_bits(values: np.ndarray, attributes: Dataset, options: RenderOptions) -> np.ndarray:
    values = values.astype(np.float64)
    window = _window(attributes, options)
    if window is not None and window[1] > 0:
        center, width, function = window
        if function == "sigmoid":
            scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "linear_exact":
            scaled = ((values - center) / width + 0.5) * 255.0
        else:  # PS3.3 C.11.2.1.2.1 linear
            scaled = ((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) * 255.0
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / ((high - low) or 1.0) * 255.0
    if str(attributes.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.clip(scaled, 0, 255).astype(np.uint8)


def render(pixels: np.ndarray, attributes: Dataset, options: RenderOptions) -> bytes:
    """One decoded frame as an image a browser shows, windowed like a viewer would."""
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour: shown as is
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    else:
        values = apply_modality_lut(pixels, attributes)
        image = Image.fromarray(_to_eight_bits(values, attributes, options), "L")
    if options.viewport is not None:
        image.thumbnail(options.viewport, Image.Resampling.LANCZOS)
    out = BytesIO()
    kind = MEDIA_TYPES[options.media_type]
    image.save(out, kind, **({"quality": options.quality} if kind == "JPEG" else {}))
    return out.getvalue()
