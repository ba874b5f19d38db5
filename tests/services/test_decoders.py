"""Detector decoders recover known faces from hand-built raw outputs."""

import numpy as np
import pytest

from services.detector.decoders import (
    anchor_centers, decode_retinaface, decode_scrfd, decode_yunet, nms, retinaface_priors,
)

SIZE = 64
BOX = np.array([20.0, 5.0, 50.0, 40.0])
POINTS = np.array([[28, 18], [42, 18], [35, 25], [29, 33], [41, 33]], np.float64)


def test_scrfd_recovers_a_face_and_suppresses_its_duplicate():
    counts = {s: (SIZE // s) ** 2 * 2 for s in (8, 16, 32)}
    scores = {s: np.zeros((n, 1), np.float32) for s, n in counts.items()}
    dists = {s: np.zeros((n, 4), np.float32) for s, n in counts.items()}
    kps = {s: np.zeros((n, 10), np.float32) for s, n in counts.items()}

    def place(stride, row, col, anchor, score, box):
        index = (row * (SIZE // stride) + col) * 2 + anchor
        cx, cy = col * stride, row * stride
        scores[stride][index] = score
        dists[stride][index] = np.array([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / stride
        kps[stride][index] = ((POINTS - [cx, cy]) / stride).reshape(-1)

    place(16, 1, 2, 1, 0.9, BOX)
    place(8, 3, 4, 0, 0.5, BOX + 1.0)  # a weaker duplicate of the same face
    place(32, 1, 1, 0, 0.2, BOX)  # under the threshold
    outputs = [scores[s] for s in (8, 16, 32)] + [dists[s] for s in (8, 16, 32)] + [kps[s] for s in (8, 16, 32)]
    found = decode_scrfd(outputs, SIZE, SIZE, per_cell=2, threshold=0.3, iou=0.4)
    assert len(found.scores) == 1
    np.testing.assert_allclose(found.boxes[0], BOX, atol=1e-4)
    np.testing.assert_allclose(found.landmarks[0], POINTS, atol=1e-4)
    assert found.scores[0] == pytest.approx(0.9)


def test_retinaface_recovers_a_face_through_priors_and_variances():
    priors = retinaface_priors(SIZE, SIZE)
    assert len(priors) == sum((SIZE // s) ** 2 * 2 for s in (8, 16, 32))
    loc = np.zeros((len(priors), 4), np.float32)
    conf = np.tile(np.array([[0.99, 0.01]], np.float32), (len(priors), 1))
    landms = np.zeros((len(priors), 10), np.float32)
    index = 130  # a stride-16 prior
    prior = priors[index]
    center = np.array([(BOX[0] + BOX[2]) / 2, (BOX[1] + BOX[3]) / 2]) / SIZE
    size = np.array([BOX[2] - BOX[0], BOX[3] - BOX[1]]) / SIZE
    loc[index, :2] = (center - prior[:2]) / (0.1 * prior[2:])
    loc[index, 2:] = np.log(size / prior[2:]) / 0.2
    landms[index] = ((POINTS / SIZE - prior[:2]) / (0.1 * prior[2:])).reshape(-1)
    conf[index] = [0.1, 0.9]
    found = decode_retinaface([loc[None], conf[None], landms[None]], SIZE, SIZE, threshold=0.5)
    assert len(found.scores) == 1
    np.testing.assert_allclose(found.boxes[0], BOX, atol=1e-3)
    np.testing.assert_allclose(found.landmarks[0], POINTS, atol=1e-3)


def test_yunet_recovers_a_face_from_cell_offsets():
    per_stride = {s: (SIZE // s) ** 2 for s in (8, 16, 32)}
    cls = {s: np.zeros((1, n, 1), np.float32) for s, n in per_stride.items()}
    obj = {s: np.zeros((1, n, 1), np.float32) for s, n in per_stride.items()}
    bbox = {s: np.zeros((1, n, 4), np.float32) for s, n in per_stride.items()}
    kps = {s: np.zeros((1, n, 10), np.float32) for s, n in per_stride.items()}
    stride, row, col = 16, 1, 1
    index = row * (SIZE // stride) + col
    cx, cy = (BOX[0] + BOX[2]) / 2, (BOX[1] + BOX[3]) / 2
    cls[stride][0, index], obj[stride][0, index] = 0.81, 1.0
    bbox[stride][0, index] = [cx / stride - col, cy / stride - row,
                              np.log((BOX[2] - BOX[0]) / stride), np.log((BOX[3] - BOX[1]) / stride)]
    kps[stride][0, index] = (POINTS / stride - [col, row]).reshape(-1)
    outputs = [d[s] for d in (cls, obj, bbox, kps) for s in (8, 16, 32)]
    found = decode_yunet(outputs, SIZE, SIZE, threshold=0.6)
    assert len(found.scores) == 1 and found.scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(found.boxes[0], BOX, atol=1e-4)
    np.testing.assert_allclose(found.landmarks[0], POINTS, atol=1e-4)


def test_anchor_centres_repeat_per_cell_in_row_major_order():
    centers = anchor_centers(32, 48, 16, 2)
    assert centers.tolist()[:6] == [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0]]
    assert centers[-1].tolist() == [32, 16]


def test_nms_keeps_the_best_of_overlapping_boxes_and_distinct_ones():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keep = nms(boxes, np.array([0.6, 0.9, 0.5]), 0.4)
    assert keep.tolist() == [1, 2]
