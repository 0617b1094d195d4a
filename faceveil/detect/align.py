"""Face alignment: a similarity transform from 5 landmarks to a recogniser's template, and the warp itself.

Coordinates are in pixel-centre units everywhere (pixel (i, j) is centred at x=j, y=i), the convention of
the detector's landmarks, of cv2.warpAffine and of dlib. Landmark and template order: left eye, right eye,
nose tip, left mouth corner, right mouth corner ("left" = the image's left).

Matrices are 2x3 affine [A | t] acting on column vectors (x, y, 1). `warp_matrix` maps image -> crop (what
cv2.warpAffine would take); `inverse_matrix` gives crop -> image, which is what sampling needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ARCFACE_112 = (
    (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041),
)

FACENET_160 = ((54.95, 65.94), (108.13, 64.96), (82.06, 90.38), (58.99, 112.47), (106.21, 111.64))

# dlib's mean 68-point face shape (get_face_chip_details in dlib/image_transforms/interpolation.h),
# normalised coordinates; only the points used here: eye contours 36-41 and 42-47, nose tip 30, mouth
# corners 48 and 54.
_DLIB_MEAN_SHAPE = {
    30: (0.490127, 0.515625),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 54: (0.726104, 0.780233),
}


def dlib_chip_template(size: int = 150, padding: float = 0.25) -> Points:
    """Where a mean face's eye centres, nose tip and mouth corners land in dlib's get_face_chip chips.

    dlib puts mean-shape point m at chip point size * (padding + m) / (1 + 2 padding) and fits a similarity
    transform from those chip points to the face's 68 landmarks (eyes, nose, upper mouth); extract_image_chip
    then maps the chip's corner pixels (0, 0) and (size-1, 0) to the transform of chip points (0, 0) and
    (size, 0), so chip point p lands on pixel p * (size - 1) / size. A face shaped like the mean face
    therefore has its landmarks exactly there. Eye centre = mean of the 6 eye-contour points (the pupil, like
    MTCNN's eye).
    """
    def chip(m: tuple[float, float]) -> tuple[float, float]:
        return tuple((size - 1) * (padding + v) / (1 + 2 * padding) for v in m)  # type: ignore[return-value]

    left_eye = tuple(np.mean([_DLIB_MEAN_SHAPE[i] for i in range(36, 42)], axis=0))
    right_eye = tuple(np.mean([_DLIB_MEAN_SHAPE[i] for i in range(42, 48)], axis=0))
    points = (left_eye, right_eye, _DLIB_MEAN_SHAPE[30], _DLIB_MEAN_SHAPE[48], _DLIB_MEAN_SHAPE[54])
    return tuple(tuple(round(float(v), 4) for v in chip(p)) for p in points)  # type: ignore[return-value]


Points = tuple[tuple[float, float], ...]


def resize_template(points: Points, old: int, new: int) -> Points:
    """The same template for a crop of `new` pixels instead of `old` (same field of view, pixel centres)."""
    k = new / old
    return tuple(((x + 0.5) * k - 0.5, (y + 0.5) * k - 0.5) for x, y in points)


@dataclass(frozen=True)
class CropGeometry:
    """A square crop of `size` pixels; its 5 landmark positions are `base` shrunk about the centre by `scale`.

    scale < 1 shows more context around the face (a looser crop); tune it with `with_scale`.
    """

    name: str
    size: int
    base: Points
    scale: float = 1.0

    @property
    def template(self) -> np.ndarray:
        """[5, 2] float64 landmark positions in the crop."""
        centre = (self.size - 1) / 2
        return centre + (np.asarray(self.base, dtype=np.float64) - centre) * self.scale

    def with_scale(self, scale: float) -> CropGeometry:
        return dataclasses.replace(self, scale=float(scale))


GEOMETRIES: dict[str, CropGeometry] = {}


def register(geometry: CropGeometry) -> CropGeometry:
    GEOMETRIES[geometry.name] = geometry
    return geometry


register(CropGeometry("arcface112", 112, ARCFACE_112))
# 1/1.2 measured best for faceres/faceres-deep on LFW folds 0-1 (1/1.0 .. 1/1.4 tried; the docs said 1/1.4)
register(CropGeometry("loose224", 224, resize_template(ARCFACE_112, 112, 224), scale=1 / 1.2))
register(CropGeometry("dlib150", 150, dlib_chip_template(150, 0.25)))
# FaceNet's own crop is the MTCNN box + 32 px margin (LFW pixels) stretched to 160x160 (boxes are 0.75 as wide as
# tall); this template is where the 5 landmarks land in it on average (the 7,701 images of LFW's pairs). LFW, 600
# pairs, 10-fold accuracy (d'): facenet-vgg this template 0.995 (5.60), looser x1/0.9 0.995 (5.54), the box crop
# 0.990 (5.77), box + 44 at 182 centre 160 0.995 (5.83), prewhitened 0.982 (4.26); facenet-casia this template
# 0.978 (4.61), the box crop 0.988 (5.26), prewhitened 0.968 (3.66). The box crop's stretch is what a similarity
# warp cannot give: casia would gain from an anisotropic geometry.
register(CropGeometry("facenet160", 160, FACENET_160))


def get_geometry(geometry: str | CropGeometry) -> CropGeometry:
    if isinstance(geometry, CropGeometry):
        return geometry
    try:
        return GEOMETRIES[geometry]
    except KeyError:
        raise ValueError(f"unknown crop geometry {geometry!r}: known are {', '.join(GEOMETRIES)}") from None


# ----------------------------------------------------------------------------------------------- transforms


def similarity_batch(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    src, dst [..., N, 2] -> [..., 2, 3]. Umeyama (1991): SVD of the cross-covariance, with the sign of the
    last singular direction flipped when the best orthogonal map would be a reflection.
    """
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum((-2, -1)) / src.shape[-2]
    if bool((var_s <= 1e-12).any()):
        raise ValueError("landmarks are degenerate (all at one point): cannot fit a similarity transform")
    cov = xd.transpose(-2, -1) @ xs / src.shape[-2]
    u, sigma, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    d = torch.stack([torch.ones_like(sign), sign], dim=-1)
    rotation = u @ torch.diag_embed(d) @ vh
    scale = (sigma * d).sum(-1) / var_s
    linear = scale[..., None, None] * rotation
    shift = mu_d.transpose(-2, -1) - linear @ mu_s.transpose(-2, -1)
    return torch.cat([linear, shift], dim=-1)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """numpy version of `similarity_batch`: [N,2], [N,2] -> [2,3] float64."""
    return similarity_batch(torch.as_tensor(np.asarray(src)), torch.as_tensor(np.asarray(dst))).numpy()


def warp_matrix(landmarks: torch.Tensor | np.ndarray, geometry: str | CropGeometry) -> torch.Tensor:
    """Image -> crop affine matrix [..., 2, 3] (float64) aligning landmarks [..., 5, 2] to the geometry."""
    geometry = get_geometry(geometry)
    marks = torch.as_tensor(np.asarray(landmarks) if isinstance(landmarks, np.ndarray) else landmarks)
    template = torch.as_tensor(geometry.template).expand_as(marks)
    return similarity_batch(marks, template)


def inverse_matrix(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inverse of affine matrices [..., 2, 3] (e.g. crop -> image from image -> crop)."""
    m = torch.as_tensor(matrix).to(torch.float64)
    linear_inv = torch.linalg.inv(m[..., :2])
    return torch.cat([linear_inv, -linear_inv @ m[..., 2:]], dim=-1)


def crop_to_image_matrix(landmarks: torch.Tensor | np.ndarray, geometry: str | CropGeometry) -> torch.Tensor:
    """Crop -> image matrix [..., 2, 3]: where each crop pixel comes from."""
    return inverse_matrix(warp_matrix(landmarks, geometry))


def transform_points(matrix: np.ndarray | torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points [N, 2]."""
    m = np.asarray(matrix, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ m[:, :2].T + m[:, 2]


# ----------------------------------------------------------------------------------------------- warping


def align(image: np.ndarray, landmarks: np.ndarray, geometry: str | CropGeometry) -> np.ndarray:
    """Aligned crop [S,S,C] of an HxWxC image: bilinear, black outside; uint8 in -> uint8, else float32."""
    geometry = get_geometry(geometry)
    matrix = crop_to_image_matrix(np.asarray(landmarks, dtype=np.float64), geometry).numpy()
    out = sample_bilinear(np.asarray(image), matrix, geometry.size)
    if np.asarray(image).dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def sample_bilinear(image: np.ndarray, crop_to_image: np.ndarray, size: int) -> np.ndarray:
    """Crop [size,size,C] float32: pixel (u, v) is the image's bilinear value at M @ (u, v, 1), 0 outside."""
    pixels = image if image.ndim == 3 else image[:, :, None]
    h, w = pixels.shape[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = crop_to_image[0, 0] * u + crop_to_image[0, 1] * v + crop_to_image[0, 2]
    y = crop_to_image[1, 0] * u + crop_to_image[1, 1] * v + crop_to_image[1, 2]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    out = np.zeros((size, size, pixels.shape[2]), dtype=np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            values = pixels[yi.clip(0, h - 1), xi.clip(0, w - 1)].astype(np.float64)
            out += values * (wx * wy) * inside[..., None]
    out = out.astype(np.float32)
    return out if image.ndim == 3 else out[:, :, 0]


def sampling_theta(crop_to_image: torch.Tensor, image_hw: tuple[int, int], crop_size: int) -> torch.Tensor:
    """F.affine_grid theta [..., 2, 3] (align_corners=False) for a crop -> image pixel matrix."""
    h, w = image_hw
    m = torch.as_tensor(crop_to_image).to(torch.float64)
    # crop normalised -> crop pixels: u = ((g + 1) S - 1) / 2; image pixels -> normalised: g = (2x + 1)/W - 1
    half, mid = crop_size / 2, (crop_size - 1) / 2
    to_pixels = torch.tensor([[half, 0, mid], [0, half, mid], [0, 0, 1]], dtype=torch.float64)
    to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1]], dtype=torch.float64)
    full = torch.cat([m, torch.tensor([0, 0, 1], dtype=torch.float64).expand(*m.shape[:-2], 1, 3)], dim=-2)
    return to_norm @ full @ to_pixels


def warp(images: torch.Tensor, crop_to_image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Differentiable aligned crops: images [B,C,H,W] (float), matrices [B,2,3] crop -> image -> [B,C,S,S].

    Bilinear, zeros outside: the same values as `align` (up to float rounding).
    """
    theta = sampling_theta(crop_to_image, tuple(images.shape[-2:]), crop_size).to(images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], crop_size, crop_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp_faces(images: torch.Tensor, landmarks: torch.Tensor | np.ndarray,
               geometry: str | CropGeometry) -> torch.Tensor:
    """`warp` with matrices from landmarks [B,5,2] and a named geometry."""
    geometry = get_geometry(geometry)
    return warp(images, crop_to_image_matrix(landmarks, geometry), geometry.size)
