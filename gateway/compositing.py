"""Putting generated faces back into frames: box crops and hard paste, FFHQ-aligned crops and feathered blends."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .alignment import align_face, feathered_ellipse_mask, feathered_rect_mask, paste_aligned, template
from .faces import Box, Target

FACE_SIZE = 96
ALIGNED_SIZE = 256
MOUTH_WINDOW = (65, 241, 62, 194)  # rows top, bottom, columns left, right of the 256 aligned crop
LOWER_FACE_MASK = feathered_ellipse_mask(ALIGNED_SIZE, (128, 178), (66, 60), blur=8)
ENHANCE_SIZE = 512
ENHANCE_MASKS = {
    "face": feathered_rect_mask(ENHANCE_SIZE, erode=24, blur=16),
    "mouth": feathered_ellipse_mask(ENHANCE_SIZE, (257, 371), (120, 90), blur=16),
}



def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE))


def paste_face(frame: np.ndarray, box: Box, face: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(face, (x2 - x1, y2 - y1))
    return out


def mouth_window(padding: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    top, bottom, left, right = MOUTH_WINDOW
    pad_top, pad_bottom, pad_left, pad_right = padding
    return (max(0, top - pad_top), min(ALIGNED_SIZE, bottom + pad_bottom),
            max(0, left - pad_left), min(ALIGNED_SIZE, right + pad_right))


@dataclass(frozen=True)
class AlignedCrop:
    crop: np.ndarray  # 256x256 FFHQ-aligned
    matrix: np.ndarray  # frame -> crop


def aligned_input(frame: np.ndarray, target: Target, window: tuple[int, int, int, int]) -> tuple[AlignedCrop, np.ndarray]:
    """The aligned 256 crop and its mouth window resized to Wav2Lip's 96x96."""
    crop, matrix = align_face(frame, target.landmarks, template("ffhq", ALIGNED_SIZE), ALIGNED_SIZE)
    top, bottom, left, right = window
    return AlignedCrop(crop, matrix), cv2.resize(crop[top:bottom, left:right], (FACE_SIZE, FACE_SIZE))


def aligned_paste(frame: np.ndarray, aligned: AlignedCrop, face: np.ndarray,
                  window: tuple[int, int, int, int]) -> np.ndarray:
    """Writes the prediction into the mouth window, then blends the lower face back through the inverse transform."""
    top, bottom, left, right = window
    crop = aligned.crop.copy()
    crop[top:bottom, left:right] = cv2.resize(face, (right - left, bottom - top))
    return paste_aligned(frame, crop, aligned.matrix, LOWER_FACE_MASK)
