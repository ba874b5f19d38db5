"""5-point face alignment: similarity transforms to the ArcFace (112) and FFHQ (512) templates and back."""

from __future__ import annotations

import cv2
import numpy as np

# Standard ArcFace 112x112 template (eyes, nose tip, mouth corners), as used by InsightFace.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) mapping source points onto target."""
    matrix, _ = cv2.estimateAffinePartial2D(source.astype(np.float32), target.astype(np.float32), method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate; cannot align the face")
    return matrix


def align_face(frame: np.ndarray, landmarks: np.ndarray, template: np.ndarray = ARCFACE_112,
               size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Warps the face so its 5 landmarks land on the template; returns (crop, 2x3 matrix frame->crop)."""
    matrix = similarity_transform(landmarks, template * (size / 112.0 if template is ARCFACE_112 else 1.0))
    crop = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, matrix
