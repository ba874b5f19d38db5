"""5-point face alignment: similarity transforms to the ArcFace and FFHQ templates, and feathered paste-back."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from service_runtime.errors import FailedPrecondition

# ArcFace 112x112 template (eyes, nose tip, mouth corners), as InsightFace uses it.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)
# FFHQ 512x512 template, as GFPGAN / facexlib align faces for restoration.
FFHQ_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    np.float32,
)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) mapping source points onto target."""
    matrix, _ = cv2.estimateAffinePartial2D(source.astype(np.float32), target.astype(np.float32), method=cv2.LMEDS)
    if matrix is None:
        raise FailedPrecondition("the face's landmarks are degenerate (too close together); cannot align it")
    return matrix


def template(name: str, size: int) -> np.ndarray:
    base, base_size = (ARCFACE_112, 112) if name == "arcface" else (FFHQ_512, 512)
    return base * (size / base_size)


def align_face(frame: np.ndarray, landmarks: np.ndarray, points: np.ndarray = ARCFACE_112,
               size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Warps the face so its 5 landmarks land on `points`; returns (crop, 2x3 matrix frame -> crop)."""
    matrix = similarity_transform(landmarks, points)
    crop = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, matrix


@dataclass(frozen=True)
class Roi:
    """A rectangle of the frame, x2/y2 exclusive."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def empty(self) -> bool:
        return self.x2 <= self.x1 or self.y2 <= self.y1


def footprint(matrix: np.ndarray, size: int, frame_shape: tuple[int, ...],
              part: tuple[int, int, int, int] | None = None) -> Roi:
    """The frame rectangle covered by an aligned size x size crop (inverse of `matrix`), clipped; or by `part` of
    the crop only (x1, y1, x2, y2 in crop coordinates)."""
    x1, y1, x2, y2 = part if part is not None else (0, 0, size, size)
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]], np.float32)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    height, width = frame_shape[:2]
    left, top = np.floor(mapped.min(axis=0)).astype(int) - 1
    right, bottom = np.ceil(mapped.max(axis=0)).astype(int) + 1
    return Roi(max(0, left), max(0, top), min(width, right), min(height, bottom))


def paste_aligned(frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blends the aligned crop back through the inverse transform, only where the mask reaches.

    `mask` is float32 in [0, 1] in crop coordinates; where it is 0 the frame keeps its exact pixels. Only the
    frame rectangle under the mask's non-zero part is warped and blended (the lower-face ellipse is a quarter of
    the crop), in one OpenCV pass over uint8 (cv2.blendLinear): 4.5 ms became 0.6 ms for a 300-pixel face in a
    720p frame, on this machine's cores."""
    x, y, w, h = cv2.boundingRect((mask > 0).view(np.uint8))
    roi = footprint(matrix, crop.shape[0], frame.shape, (x, y, x + w, y + h))
    out = frame.copy()
    if roi.empty or w == 0:
        return out
    inverse = cv2.invertAffineTransform(matrix)
    inverse[:, 2] -= (roi.x1, roi.y1)  # warp straight into the ROI, not the whole frame
    shape = (roi.x2 - roi.x1, roi.y2 - roi.y1)
    warped = cv2.warpAffine(crop, inverse, shape, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.warpAffine(mask, inverse, shape, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    region = out[roi.y1 : roi.y2, roi.x1 : roi.x2]
    # alpha * crop + (1 - alpha) * frame, rounded; where alpha is 0 that is the frame's pixel exactly.
    out[roi.y1 : roi.y2, roi.x1 : roi.x2] = cv2.blendLinear(warped, region, alpha, 1.0 - alpha)
    return out


def feathered_rect_mask(size: int, erode: int, blur: int) -> np.ndarray:
    """The whole aligned square, eroded and blurred at its edges (for full-face enhancement)."""
    mask = np.zeros((size, size), np.float32)
    mask[erode : size - erode, erode : size - erode] = 1.0
    return _blur(mask, blur)


def feathered_ellipse_mask(size: int, center: tuple[float, float], axes: tuple[float, float], blur: int) -> np.ndarray:
    """An ellipse shrunk by the blur radius and then blurred, so the feather stays inside the ellipse."""
    mask = np.zeros((size, size), np.float32)
    inner = (max(1, int(axes[0] - blur)), max(1, int(axes[1] - blur)))
    cv2.ellipse(mask, (int(center[0]), int(center[1])), inner, 0, 0, 360, 1.0, -1)
    return _blur(mask, blur)


def _blur(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    kernel = 2 * radius + 1
    return cv2.GaussianBlur(mask, (kernel, kernel), radius / 2)
