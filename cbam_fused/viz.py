"""cbam_fused.viz: spatial attention maps as pictures (matplotlib, Agg canvas; no pyplot state).

    with cbam_fused.record_attention(model) as maps:
        model(images)
    cbam_fused.viz.save_overlay("gate.png", images[0], maps["layer4.1.cbam"][1][0])
    cbam_fused.viz.save_grid("gates.png", images[0], maps)        # one panel per block

A spatial gate gs [1, h, w] (or [h, w], or [N, 1, h, w] with `sample`) is upsampled bilinearly to
the image size and drawn over it with a colour map. By default each map is stretched to its own
min..max (gates of a trained network often span a narrow band around 0.5); normalize=False draws
the raw sigmoid values on a fixed 0..1 scale."""
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["overlay", "save_overlay", "save_grid", "upsample_gate", "save_model_attention"]


def _image_array(image) -> np.ndarray:
    """[H, W, 3] float in 0..1 from a tensor [3, H, W] / [1, 3, H, W] / [H, W] / [H, W, 3], a
    numpy array or a PIL image; values outside 0..1 (normalised inputs) are min-max scaled."""
    if hasattr(image, "convert") and not isinstance(image, (Tensor, np.ndarray)):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        t = image.detach().to("cpu", torch.float64)
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"image: expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        a = t.numpy()
    else:
        a = np.asarray(image, dtype=np.float64)
        if a.dtype == np.uint8 or a.max() > 1.0 and a.min() >= 0 and a.max() <= 255:
            a = a / 255.0
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected [3, H, W], [H, W, 3] or [H, W], got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo if hi > lo else 1.0)
    return a


def upsample_gate(gate: Tensor, size: Tuple[int, int], sample: int = 0) -> np.ndarray:
    """A spatial gate ([N, 1, h, w], [1, h, w] or [h, w]) as an [H, W] array, bilinear."""
    g = torch.as_tensor(gate).detach().to("cpu", torch.float64)
    if g.dim() == 4:
        g = g[sample]
    if g.dim() == 3:
        if g.shape[0] != 1:
            raise ValueError(f"gate: expected one map [1, h, w], got shape {tuple(g.shape)}")
        g = g[0]
    if g.dim() != 2:
        raise ValueError(f"gate: expected a 2-d spatial gate ([N, 1, h, w], [1, h, w] or "
                         f"[h, w]), got shape {tuple(gate.shape)}")
    g = F.interpolate(g[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return g[0, 0].numpy()


def _cmap(name):
    import matplotlib
    return matplotlib.colormaps[name]


def overlay(image, gate, *, alpha: float = 0.5, cmap: str = "jet", normalize: bool = True,
            sample: int = 0) -> np.ndarray:
    """The image with the upsampled gate blended over it: [H, W, 3] float in 0..1."""
    img = _image_array(image)
    g = upsample_gate(gate, img.shape[:2], sample)
    if normalize:
        lo, hi = float(g.min()), float(g.max())
        g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    heat = _cmap(cmap)(np.clip(g, 0.0, 1.0))[..., :3]
    return np.clip((1 - alpha) * img + alpha * heat, 0.0, 1.0)


def _canvas(nrows, ncols, panel_inches=3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(panel_inches * ncols, panel_inches * nrows))
    FigureCanvasAgg(fig)
    return fig


def save_overlay(path, image, gate, *, alpha: float = 0.5, cmap: str = "jet",
                 normalize: bool = True, sample: int = 0, title: Optional[str] = None,
                 dpi: int = 100) -> None:
    """Save a PNG of the image with one spatial gate over it."""
    fig = _canvas(1, 1)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(overlay(image, gate, alpha=alpha, cmap=cmap, normalize=normalize, sample=sample))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


GateMap = Union[Tensor, Tuple[Optional[Tensor], Optional[Tensor]]]


def save_grid(path, image, gates: Union[Mapping[str, GateMap], Sequence[GateMap]], *,
              ncols: int = 4, alpha: float = 0.5, cmap: str = "jet", normalize: bool = True,
              sample: int = 0, show_image: bool = True, dpi: int = 100) -> int:
    """Save a PNG grid: the image, then one overlay per block. `gates` maps names to spatial
    gates, or to (gc, gs) pairs as record_attention gives them (blocks without a spatial gate are
    left out); a sequence is numbered. Returns the number of overlays drawn."""
    items = list(gates.items()) if isinstance(gates, Mapping) else \
        [(str(i), g) for i, g in enumerate(gates)]
    panels = []
    for name, g in items:
        if isinstance(g, tuple):
            g = g[1]
        if g is None or torch.as_tensor(g).dim() - (1 if torch.as_tensor(g).dim() == 4 else 0) \
                not in (2, 3):
            continue
        panels.append((name, g))
    if not panels:
        raise ValueError("gates: no 2-d spatial gate to draw")
    n = len(panels) + (1 if show_image else 0)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig = _canvas(nrows, ncols)
    i = 0
    if show_image:
        ax = fig.add_subplot(nrows, ncols, 1)
        ax.imshow(_image_array(image[sample] if isinstance(image, Tensor) and image.dim() == 4
                               else image))
        ax.set_title("input", fontsize=9)
        ax.set_axis_off()
        i = 1
    for name, g in panels:
        i += 1
        ax = fig.add_subplot(nrows, ncols, i)
        img = image[sample] if isinstance(image, Tensor) and image.dim() == 4 else image
        ax.imshow(overlay(img, g, alpha=alpha, cmap=cmap, normalize=normalize, sample=sample))
        h, w = torch.as_tensor(g).shape[-2:]
        ax.set_title(f"{name} ({h}x{w})", fontsize=8)
        ax.set_axis_off()
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return len(panels)


def save_model_attention(path, model, images: Tensor, *, sample: int = 0, **kwargs):
    """One forward of `model` on `images` (no grad, the model's current mode) under
    record_attention, then save_grid of every block's spatial gate over images[sample].
    Returns (output, maps)."""
    from .convert import record_attention
    with torch.no_grad(), record_attention(model) as maps:
        out = model(images)
    save_grid(path, images, maps, sample=sample, **kwargs)
    return out, maps
