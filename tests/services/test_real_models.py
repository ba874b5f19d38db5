"""The real detector and recognition models in ../shared/models, through the detector service."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc

from gateway.alignment import align_face
from service_runtime.images import encode_image
from service_runtime.manifest import load_manifest
from services.detector.service import DetectorService, DetectorSettings

from tests.support.paths import ROOT, SHARED_MEDIA, SHARED_MODELS, shared_file
from tests.support.inprocess import local_settings, started

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def real_models_dir(tmp_path_factory) -> Path:
    """The project manifest beside links to the shared real files (nothing copied into the project)."""
    folder = tmp_path_factory.mktemp("real_models")
    (folder / "manifest.json").write_text((ROOT / "models" / "manifest.json").read_text())
    for spec in load_manifest(folder).models.values():
        source = SHARED_MODELS / spec.file
        if source.is_file():
            os.symlink(source, folder / spec.file)
    return folder


def detector_service(models_dir, detection_model="scrfd_2.5g"):
    shared_file(SHARED_MODELS, load_manifest(models_dir).get(detection_model).file)
    shared_file(SHARED_MODELS, "mobilefacenet_pixamatch.onnx")
    settings = local_settings(DetectorSettings, models_dir, allow_dev_models=False,
                              detection_model=detection_model, recognition_model="mobilefacenet")
    return DetectorService(settings)


def image(name):
    return cv2.imread(str(shared_file(SHARED_MEDIA, name)), cv2.IMREAD_COLOR)


async def detect(channel, *frames):
    reply = await detector_pb2_grpc.DetectorStub(channel).Detect(
        detector_pb2.DetectRequest(frames=[encode_image(f) for f in frames])
    )
    return reply.frames


async def test_scrfd_finds_the_astronaut_and_nothing_in_the_coffee(real_models_dir):
    astronaut, coffee = image("face_astronaut.png"), image("noface_coffee.png")
    async with started(detector_service(real_models_dir)) as (_, channel):
        with_face, without = await detect(channel, astronaut, coffee)
    assert len(with_face.faces) == 1 and len(without.faces) == 0
    face = with_face.faces[0]
    # The astronaut's face sits in the upper middle of the 512x512 photo.
    assert 150 < (face.x1 + face.x2) / 2 < 300 and 50 < (face.y1 + face.y2) / 2 < 200
    assert face.score > 0.5 and len(face.landmarks) == 5
    left_eye, right_eye = face.landmarks[0], face.landmarks[1]
    assert left_eye.x < right_eye.x  # image-left eye first


async def test_boxes_come_back_in_the_sent_frame_coordinates(real_models_dir):
    astronaut = image("face_astronaut.png")
    wide = np.full((512, 1024, 3), 128, np.uint8)
    wide[:, 512:] = astronaut  # letterboxing must not shift the box
    async with started(detector_service(real_models_dir)) as (_, channel):
        (alone,), (shifted,) = [(await detect(channel, f))[0].faces for f in (astronaut, wide)]
    assert abs((shifted.x1 - 512) - alone.x1) < 8 and abs(shifted.y1 - alone.y1) < 8
    assert abs((shifted.x2 - 512) - alone.x2) < 8 and abs(shifted.y2 - alone.y2) < 8


async def test_yunet_decoder_agrees_with_opencv_face_detector_yn(real_models_dir):
    astronaut = image("face_astronaut.png")
    path = shared_file(SHARED_MODELS, "face_detection_yunet_2026may.onnx")
    reference = cv2.FaceDetectorYN.create(str(path), "", (512, 512), 0.6, 0.3)
    _, faces = reference.detect(astronaut)
    assert faces is not None and len(faces) == 1
    x, y, w, h = faces[0][:4]
    async with started(detector_service(real_models_dir, "yunet")) as (_, channel):
        (frame,) = await detect(channel, astronaut)
    assert len(frame.faces) == 1
    ours = frame.faces[0]
    np.testing.assert_allclose([ours.x1, ours.y1, ours.x2, ours.y2], [x, y, x + w, y + h], atol=6)


async def test_mobilefacenet_embeddings_tell_people_apart(real_models_dir):
    astronaut, people = image("face_astronaut.png"), image("face_people_0.png")
    moved = cv2.resize(astronaut, (400, 400))  # the same person at another scale
    async with started(detector_service(real_models_dir)) as (_, channel):
        frames = await detect(channel, astronaut, moved, people)
        crops = []
        for picture, found in zip((astronaut, moved, people), frames):
            points = np.array([[p.x, p.y] for p in found.faces[0].landmarks], np.float32)
            crops.append(align_face(picture, points)[0])
        reply = await detector_pb2_grpc.DetectorStub(channel).Embed(
            detector_pb2.EmbedRequest(faces=[encode_image(c) for c in crops])
        )
    a, b, c = (np.array(e.values) for e in reply.embeddings)
    assert a.shape == (128,) and abs(np.linalg.norm(a) - 1) < 1e-5
    assert a @ b > 0.6, "same person should match"
    assert a @ c < 0.4, "different people should not match"


def video_frames(name, indices):
    import av
    wanted, frames = set(indices), []
    with av.open(str(shared_file(SHARED_MEDIA, name))) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames.append(frame.to_ndarray(format="bgr24"))
            if index >= max(indices):
                break
    return frames


async def test_boxes_agree_between_the_square_and_the_aspect_kept_input_on_real_faces(real_models_dir):
    """Detection at the frame's own aspect (the default, 56-60% of the square's pixels on 16:9) finds the same
    faces as the seed's square letterbox, within a few pixels."""
    frames = video_frames("face_astronaut_moving_720p25_5s.mp4", [0, 40, 80, 120])
    frames += [image("face_people_0.png"), image("face_astronaut.png")]
    boxes = {}
    for square in (True, False):
        service = detector_service(real_models_dir)
        service.detector.square = square
        async with started(service) as (_, channel):
            boxes[square] = [[(f.x1, f.y1, f.x2, f.y2) for f in sorted(found.faces, key=lambda f: f.x1)]
                             for found in await detect(channel, *frames)]
    assert [len(b) for b in boxes[True]] == [len(b) for b in boxes[False]] and all(boxes[False])
    worst = max(abs(a - b) for frame_s, frame_a in zip(boxes[True], boxes[False])
                for box_s, box_a in zip(frame_s, frame_a) for a, b in zip(box_s, box_a))
    assert worst <= 4.0, worst
