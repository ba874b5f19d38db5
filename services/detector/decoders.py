"""Raw detector outputs -> face boxes, scores and 5 landmarks (RetinaFace, SCRFD and YuNet layouts)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Detections:
    """N faces in model-input pixels: boxes Nx4 (x1, y1, x2, y2), scores N, landmarks Nx5x2."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    def select(self, keep: np.ndarray) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep], self.landmarks[keep])

    def scaled(self, factor: float) -> "Detections":
        return Detections(self.boxes * factor, self.scores, self.landmarks * factor)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
        h = np.maximum(0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _finish(boxes, scores, landmarks, threshold: float, iou: float) -> Detections:
    # A model can emit infinities, NaN (an overflowing exp, a broken export) or inverted boxes; such a face is
    # dropped, never passed on to crop and paste arithmetic.
    mask = (scores >= threshold) & np.isfinite(scores) & np.isfinite(boxes).all(axis=1) & \
        np.isfinite(landmarks).all(axis=1)
    mask &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    found = Detections(boxes[mask].astype(np.float32), scores[mask].astype(np.float32),
                       landmarks[mask].reshape(-1, 5, 2).astype(np.float32))
    return found.select(nms(found.boxes, found.scores, iou)) if len(found.scores) else Detections.empty()


def anchor_centers(height: int, width: int, stride: int, per_cell: int, offset: float = 0.0) -> np.ndarray:
    """(x, y) of every anchor, row-major over the stride grid, `per_cell` copies per cell."""
    ys, xs = np.mgrid[: height // stride, : width // stride]
    centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) + offset) * stride
    return np.repeat(centers, per_cell, axis=0)


@np.errstate(over="ignore", invalid="ignore")  # non-finite faces are dropped in _finish
def decode_scrfd(outputs: list[np.ndarray], height: int, width: int, *, per_cell: int = 2,
                 threshold: float = 0.3, iou: float = 0.4) -> Detections:
    """SCRFD: scores, box distances (l, t, r, b) and keypoint offsets per stride, in units of the stride."""
    n = len(STRIDES)
    boxes, scores, kps = [], [], []
    for i, stride in enumerate(STRIDES):
        centers = anchor_centers(height, width, stride, per_cell)
        dist = outputs[n + i].reshape(-1, 4) * stride
        boxes.append(np.concatenate([centers - dist[:, :2], centers + dist[:, 2:]], axis=1))
        scores.append(outputs[i].reshape(-1))
        kps.append(np.tile(centers, 5) + outputs[2 * n + i].reshape(-1, 10) * stride)
    return _finish(np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps), threshold, iou)


@np.errstate(over="ignore", invalid="ignore")  # non-finite faces are dropped in _finish
def decode_yunet(outputs: list[np.ndarray], height: int, width: int, *, threshold: float = 0.6,
                 iou: float = 0.3) -> Detections:
    """YuNet (OpenCV zoo): cls, obj, bbox (dx, dy, log w, log h), kps per stride; one anchor per cell."""
    n = len(STRIDES)
    boxes, scores, kps = [], [], []
    for i, stride in enumerate(STRIDES):
        cells = anchor_centers(height, width, stride, 1)
        cls, obj = outputs[i].reshape(-1), outputs[n + i].reshape(-1)
        bbox, kp = outputs[2 * n + i].reshape(-1, 4), outputs[3 * n + i].reshape(-1, 10)
        scores.append(np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1)))
        center = cells + bbox[:, :2] * stride
        size = np.exp(bbox[:, 2:]) * stride
        boxes.append(np.concatenate([center - size / 2, center + size / 2], axis=1))
        kps.append(np.tile(cells, 5) + kp * stride)
    return _finish(np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps), threshold, iou)


RETINAFACE_MIN_SIZES = ((16, 32), (64, 128), (256, 512))


def retinaface_priors(height: int, width: int) -> np.ndarray:
    """Priors (cx, cy, w, h) normalised to the input size, as in Pytorch_Retinaface's PriorBox."""
    priors = []
    for stride, sizes in zip(STRIDES, RETINAFACE_MIN_SIZES):
        rows, cols = -(-height // stride), -(-width // stride)
        for i, j in product(range(rows), range(cols)):
            for size in sizes:
                priors.append(((j + 0.5) * stride / width, (i + 0.5) * stride / height, size / width, size / height))
    return np.asarray(priors, np.float32)


@np.errstate(over="ignore", invalid="ignore")  # non-finite faces are dropped in _finish
def decode_retinaface(outputs: list[np.ndarray], height: int, width: int, *, threshold: float = 0.5,
                      iou: float = 0.4, variances: tuple[float, float] = (0.1, 0.2)) -> Detections:
    """RetinaFace: loc offsets against priors with variances, softmax conf (face = column 1), landmarks."""
    loc, conf, landms = (o.reshape(-1, k) for o, k in zip(outputs, (4, 2, 10)))
    priors = retinaface_priors(height, width)
    centers = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(loc[:, 2:] * variances[1])
    scale = np.array([width, height], np.float32)
    boxes = np.concatenate([(centers - sizes / 2) * scale, (centers + sizes / 2) * scale], axis=1)
    points = (np.tile(priors[:, :2], 5) + landms * variances[0] * np.tile(priors[:, 2:], 5)) * np.tile(scale, 5)
    return _finish(boxes, conf[:, 1], points, threshold, iou)


DECODERS = {"scrfd": decode_scrfd, "yunet": decode_yunet, "retinaface": decode_retinaface}
