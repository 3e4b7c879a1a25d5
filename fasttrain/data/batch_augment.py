"""TrivialAugmentWide on whole batches on the device (the resident backend's auto-augment).

Every sample draws its own operation, magnitude bin and sign, as torchvision's
`TrivialAugmentWide` does per image; each operation then runs once on the sub-batch that drew it,
with per-sample magnitudes as tensors: at most 14 vectorised calls per batch instead of one
Python call per image. The operations follow torchvision's v2 functional definitions (nearest
or bilinear interpolation, zero fill, the same inverse affine matrices and sampling grid, the
same blend and grey-level formulas); they run on float images in 0..255, so results are not
rounded or truncated to integers between operations (torchvision's uint8 path is). Written here
because neither torchvision nor kornia applies TrivialAugmentWide with per-sample choices as
batched tensor ops (torchvision's transform draws one operation per call, for the whole batch).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

BINS = 31
BOUND = 255.0


def _space() -> list[tuple[str, torch.Tensor | None, bool]]:
    """(name, magnitude per bin or None, signed) for TrivialAugmentWide's operations, sorted by
    name (the order the torch backend's per-sample AutoAugment uses)."""
    space = v2.TrivialAugmentWide()._AUGMENTATION_SPACE
    out = []
    for name, (magnitudes_fn, signed) in sorted(space.items()):
        magnitudes = magnitudes_fn(BINS, 32, 32)  # (the image size matters only to the
        if magnitudes is not None and magnitudes.ndim == 0:  # non-wide policies' Translate)
            magnitudes = None
        out.append((name, magnitudes, signed))
    return out


SPACE = _space()


def inverse_affine_matrices(angle: torch.Tensor, translate: torch.Tensor, shear: torch.Tensor,
                            center: torch.Tensor) -> torch.Tensor:
    """torchvision's `_get_inverse_affine_matrix` (scale 1) for a batch: angle (B,) degrees,
    translate (B, 2), shear (B, 2) degrees, center (B, 2) in pixels relative to the image centre
    → (B, 2, 3) float64 output-to-input matrices."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
    cx, cy = center.unbind(1)
    tx, ty = translate.unbind(1)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


def affine(images: torch.Tensor, matrices: torch.Tensor,
           interpolation: str = "bilinear") -> torch.Tensor:
    """Warp float images (B, C, H, W) by per-sample inverse matrices (B, 2, 3), `interpolation`
    "nearest" or "bilinear", zeros outside: torchvision's `_affine_grid` +
    `_apply_grid_transform` (which also rounds a uint8 image's result to integers)."""
    n, _, h, w = images.shape
    device = images.device
    theta = matrices.to(device=device, dtype=torch.float32)
    x = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=device)
    y = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=device)
    base = torch.stack([x.expand(h, w), y[:, None].expand(h, w), torch.ones(h, w, device=device)],
                       dim=-1).view(1, h * w, 3).expand(n, h * w, 3)
    scale = torch.empty(2, device=device)  # filled in place: no host-to-device copy, no sync
    scale[0], scale[1] = 0.5 * w, 0.5 * h
    grid = base.bmm(theta.transpose(1, 2) / scale).view(n, h, w, 2)
    return F.grid_sample(images, grid, mode=interpolation, padding_mode="zeros",
                         align_corners=False)


def _grey(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = ratio.view(-1, 1, 1, 1)
    return (images * ratio + other * (1.0 - ratio)).clamp_(0, BOUND)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h <= 2 or w <= 2:
        return images
    kernel = torch.full((3, 3), 1.0 / 13.0, device=images.device)  # filled in place: no sync
    kernel[1, 1] = 5.0 / 13.0
    blurred = F.conv2d(images, kernel.expand(images.shape[1], 1, 3, 3), groups=images.shape[1])
    out = images.clone()  # the border keeps its pixels, as torchvision's
    inner = out[..., 1:-1, 1:-1]
    inner.copy_(_blend(inner, blurred, factor))  # _blend clamps
    return out


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, torch.ones_like(low), (high - low) / BOUND)
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((images - low) / inv_scale).clamp_(0, BOUND)


GEOMETRY = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _geometry_matrices(name: str, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) float64 inverse matrices of a geometric operation for CPU magnitudes (B,)."""
    n = magnitude.shape[0]
    mag = magnitude.to(torch.float64)
    shear = torch.zeros(n, 2, dtype=torch.float64)
    translate = torch.zeros(n, 2, dtype=torch.float64)
    angle, center = torch.zeros(n, dtype=torch.float64), torch.zeros(n, 2, dtype=torch.float64)
    if name.startswith("Shear"):
        shear[:, 0 if name == "ShearX" else 1] = torch.rad2deg(torch.atan(mag))
        center[:] = torch.tensor([-w * 0.5, -h * 0.5], dtype=torch.float64)  # center=[0, 0]
    elif name.startswith("Translate"):
        translate[:, 0 if name == "TranslateX" else 1] = mag.trunc()  # int(magnitude)
    else:
        angle = -mag  # F.rotate inverts the angle for its matrix
    return inverse_affine_matrices(angle, translate, shear, center)


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat float64 tensor holding `tensors` (exact for int64 below 2**53 and float32)."""
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def _unpack(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors `_pack(like)` held, on `flat`'s device, with `like`'s shapes and dtypes."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return out


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors → `device` in one transfer that does not wait for the GPU. A plain `.to(cuda)`
    of a CPU tensor synchronises the stream; the ~25 small ones a batch of TrivialAugmentWide
    needed made the host wait on the GPU that many times per batch."""
    if device.type == "cpu" or not tensors:
        return tensors
    flat = _pack(tensors)
    if device.type == "cuda":
        flat = flat.pin_memory()  # from the caching host allocator: the copy need not sync
    return _unpack(flat.to(device, non_blocking=True), tensors)


def _apply(name: str, images: torch.Tensor, magnitude: torch.Tensor,
           matrices: torch.Tensor | None, interpolation: str) -> torch.Tensor:
    """`apply_op` with its per-sample parameters already on the images' device: magnitudes (B,)
    and, for the geometric operations, the (B, 2, 3) matrices of `_geometry_matrices`."""
    if name in GEOMETRY:
        return affine(images, matrices, interpolation)
    factor = (1.0 + magnitude).to(images.dtype)
    if name == "Brightness":
        return _blend(images, torch.zeros_like(images), factor)
    if name == "Color":
        return _blend(images, _grey(images).floor_(), factor)
    if name == "Contrast":
        return _blend(images, _grey(images).floor_().mean(dim=(-3, -2, -1), keepdim=True), factor)
    if name == "Sharpness":
        return _sharpness(images, factor)
    if name == "Posterize":
        step = (2.0 ** (8 - magnitude)).view(-1, 1, 1, 1).to(images.dtype)
        return torch.where(step > 1, torch.floor(images / step) * step, images)
    if name == "Solarize":
        threshold = (BOUND * magnitude).view(-1, 1, 1, 1).to(images.dtype)
        return torch.where(images >= threshold, BOUND - images, images)
    if name == "AutoContrast":
        return _autocontrast(images)
    if name == "Equalize":  # a histogram operation: on the uint8 levels, as torchvision
        return TF.equalize(images.round().clamp_(0, BOUND).to(torch.uint8)).to(images.dtype)
    if name == "Identity":
        return images
    raise ValueError(f"unknown TrivialAugmentWide operation {name!r}")


def apply_op(name: str, images: torch.Tensor, magnitude: torch.Tensor,
             interpolation: str = "bilinear") -> torch.Tensor:
    """One TrivialAugmentWide operation on float images (B, C, H, W) in 0..255 with per-sample
    signed magnitudes (B,) (ignored by the operations without one); the geometric ones resample
    by `interpolation` ("bilinear" or "nearest")."""
    h, w = images.shape[-2:]
    magnitude = magnitude.cpu().to(torch.float32)
    params = [magnitude]
    if name in GEOMETRY:
        params.append(_geometry_matrices(name, magnitude, h, w))
    params = to_device(params, images.device)
    return _apply(name, images, params[0], params[1] if name in GEOMETRY else None,
                  interpolation)


def trivial_augment_wide(images: torch.Tensor, generator: torch.Generator,
                         interpolation: str = "bilinear") -> torch.Tensor:
    """TrivialAugmentWide for every sample of a float batch (B, C, H, W) in 0..255: operation
    uniform over the 14, magnitude bin uniform over 31, sign + or - with probability 1/2 for
    the signed operations, all drawn from `generator` (CPU); rotate, shear and translate
    resample by `interpolation` ("bilinear" or "nearest")."""
    n, _, h, w = images.shape
    ops = torch.randint(len(SPACE), (n,), generator=generator)
    bins = torch.randint(BINS, (n,), generator=generator)
    negative = torch.rand(n, generator=generator) < 0.5
    # Every operation's samples, magnitudes and matrices are worked out on the host first and
    # cross to the device together: the launches below then never wait for the GPU.
    plan, params = [], []
    for k, (name, magnitudes, signed) in enumerate(SPACE):
        chosen = (ops == k).nonzero().flatten()
        if len(chosen) == 0 or name == "Identity":
            continue
        magnitude = torch.zeros(len(chosen))
        if magnitudes is not None:
            magnitude = magnitudes[bins[chosen]].to(torch.float32)
            if signed:
                magnitude = torch.where(negative[chosen], -magnitude, magnitude)
        plan.append((name, len(params)))
        params += [chosen, magnitude]
        if name in GEOMETRY:
            params.append(_geometry_matrices(name, magnitude, h, w))
    params = to_device(params, images.device)
    out = images.clone()
    for name, at in plan:
        index, magnitude = params[at], params[at + 1]
        matrices = params[at + 2] if name in GEOMETRY else None
        out.index_copy_(0, index, _apply(name, images.index_select(0, index), magnitude,
                                         matrices, interpolation))
    return out
