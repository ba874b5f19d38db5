"""Target face selection, tracking, aligned crops and the enhancer's paste-back."""

import os
import shutil

import cv2
import grpc
import numpy as np
import pytest
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.alignment import FFHQ_512, align_face, footprint, paste_aligned, similarity_transform, template
from gateway.faces import Face
from service_runtime.errors import FailedPrecondition
from gateway.options import JobOptions
from gateway.compositing import ENHANCE_MASKS, LOWER_FACE_MASK
from gateway.pipeline import LipSyncJob
from gateway.metrics import GatewayMetrics
from gateway.tracking import build_tracks, detection_indices, interpolate, rank_tracks, target_per_frame

from tests.support.paths import SHARED_MEDIA, SHARED_MODELS, shared_file
from tests.support.media_factory import decode_all, encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.stack import model_clients, running_stack

RNG = np.random.default_rng(11)


def face(x1, y1, size, score=0.9):
    box = np.array([x1, y1, x1 + size, y1 + size], np.float32)
    points = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32) * size + [x1, y1]
    return Face(box, score, points)


# --- alignment math -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("angle, scale, shift", [(0, 1.0, (0, 0)), (17, 0.4, (300, 120)), (-33, 1.7, (-50, 80))])
def test_similarity_transform_puts_landmarks_on_the_template_within_a_pixel(angle, scale, shift):
    rotation = cv2.getRotationMatrix2D((256, 256), angle, scale)
    rotation[:, 2] += shift
    landmarks = FFHQ_512 @ rotation[:, :2].T + rotation[:, 2]  # a face placed anywhere in a frame
    matrix = similarity_transform(landmarks, FFHQ_512)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - FFHQ_512).max() < 1.0


def textured_frame(width=640, height=480):
    blurred = cv2.GaussianBlur(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


@pytest.mark.parametrize("region", ["face", "mouth"])
def test_paste_back_with_an_identity_enhancer_touches_only_the_face_region(region):
    frame = textured_frame()
    rotation = cv2.getRotationMatrix2D((256, 256), 12, 0.35)
    rotation[:, 2] += (180, 90)
    landmarks = FFHQ_512 @ rotation[:, :2].T + rotation[:, 2]
    crop, matrix = align_face(frame, landmarks, FFHQ_512, 512)
    out = paste_aligned(frame, crop, matrix, ENHANCE_MASKS[region])  # identity "restoration"
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [512, 0], [512, 512], [0, 512]], np.float32) @ inverse[:, :2].T + inverse[:, 2]
    region_mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillConvexPoly(region_mask, np.round(corners).astype(np.int32), 1)
    outside = region_mask == 0
    assert np.array_equal(out[outside], frame[outside])
    inside = region_mask == 1
    difference = np.abs(out[inside].astype(int) - frame[inside].astype(int)).mean(axis=0)
    assert (difference <= 1.0).all(), difference
    roi = footprint(matrix, 512, frame.shape)
    assert roi.x2 - roi.x1 < frame.shape[1] and roi.y2 - roi.y1 < frame.shape[0]  # only the face's ROI


def reference_paste(frame, crop, matrix, mask):
    """The blend written out in floats over the crop's whole footprint: frame + alpha * (crop - frame), rounded,
    the frame's own pixel where alpha is 0."""
    inverse = cv2.invertAffineTransform(matrix)
    height, width = frame.shape[:2]
    warped = cv2.warpAffine(crop, inverse, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.warpAffine(mask, inverse, (width, height), flags=cv2.INTER_LINEAR)[..., None]
    blended = np.clip(np.rint(frame + alpha * (warped.astype(np.float32) - frame)), 0, 255).astype(np.uint8)
    return np.where(alpha > 0, blended, frame)


@pytest.mark.parametrize("size, mask", [(256, LOWER_FACE_MASK), (512, ENHANCE_MASKS["face"]),
                                        (512, ENHANCE_MASKS["mouth"])], ids=["lower face", "face", "mouth"])
def test_paste_back_equals_the_float_blend_within_one_level_and_only_under_the_mask(size, mask):
    frame = textured_frame()
    rotation = cv2.getRotationMatrix2D((256, 256), 12, 0.35)
    rotation[:, 2] += (180, 90)
    _, matrix = align_face(frame, FFHQ_512 @ rotation[:, :2].T + rotation[:, 2], template("ffhq", size), size)
    crop = textured_frame(size, size)  # a "prediction" unlike the frame, so that every blended pixel moves
    out, expected = paste_aligned(frame, crop, matrix, mask), reference_paste(frame, crop, matrix, mask)
    assert np.abs(out.astype(int) - expected).max() <= 1
    changed = (out != frame).any(axis=-1)
    x, y, w, h = cv2.boundingRect((mask > 0).astype(np.uint8))
    under = footprint(matrix, size, frame.shape, (x, y, x + w, y + h))
    assert changed.sum() > 1000 and not changed[:under.y1].any() and not changed[under.y2:].any()
    assert not changed[:, :under.x1].any() and not changed[:, under.x2:].any()


# --- tracking -------------------------------------------------------------------------------------------------

def test_tracks_follow_overlapping_boxes_and_split_when_a_face_is_lost():
    detections = {0: [face(10, 10, 50), face(200, 10, 80)], 1: [face(12, 11, 50), face(203, 12, 80)],
                  2: [face(205, 12, 80)], 3: [face(14, 12, 50), face(207, 12, 80)]}
    tracks = build_tracks(detections)
    assert sorted(sorted(t.faces) for t in tracks) == [[0, 1], [0, 1, 2, 3], [3]]  # the left face was lost at 2


def test_rules_rank_tracks_by_size_or_centre():
    small_centre = build_tracks({0: [face(290, 200, 40)]})[0]
    large_corner = build_tracks({0: [face(0, 0, 120)]})[0]
    assert rank_tracks([small_centre, large_corner], "largest", (640, 480))[0] is large_corner
    assert rank_tracks([small_centre, large_corner], "center", (640, 480))[0] is small_centre


def test_interpolation_between_detected_frames():
    chosen = {0: face(0, 0, 40), 4: face(40, 20, 80)}
    faces = interpolate(chosen, [0, 4], 5)
    np.testing.assert_allclose(faces[2].box, [20, 10, 80, 70])
    np.testing.assert_allclose(faces[1].landmarks, (chosen[0].landmarks * 3 + chosen[4].landmarks) / 4, atol=1e-5)
    assert detection_indices(10, 4) == [0, 4, 8, 9] and detection_indices(9, 4) == [0, 4, 8]
    tracks = rank_tracks(build_tracks({0: [face(0, 0, 40)], 4: [face(2, 1, 40)]}), "largest", (100, 100))
    assert set(target_per_frame(tracks, [0, 4])) == {0, 4}


# --- in the pipeline, with generated models (marker faces) ------------------------------------------------------

async def test_reference_embedding_runs_once_per_track_and_detection_every_k(dev_models_dir):
    clip = marker_frames(100)  # one person (marker) drifting right: one track
    reference = encode_png(clip[0][80:152, 100:172])
    async with running_stack(dev_models_dir) as stack:
        await stack.generate(encode_video(clip), speech_wav(4.0), reference_face=reference, detect_every=5)
        gateway_text = await stack.metrics_text("gateway")
        detector_text = await stack.metrics_text("detector")
    assert "swl_gateway_track_embeddings_total 1.0" in gateway_text
    detected = [l for l in detector_text.splitlines()
                if l.startswith('swl_model_items_total{model="scrfd_2.5g",outcome="ok"')]
    redetected = next(float(l.split()[-1]) for l in gateway_text.splitlines()
                      if l.startswith("swl_gateway_redetected_frames_total"))
    # 100 frames every 5th (20) plus the last one, plus the reference photo, plus the frames between detections
    # where the generated detector's box jumped a 32-pixel anchor cell (the drift check).
    assert redetected < 40
    assert detected == [f'swl_model_items_total{{model="scrfd_2.5g",outcome="ok"}} {22.0 + redetected}']


async def test_enhancer_warning_and_identity_enhancement_in_the_pipeline(identity_models_dir):
    async with running_stack(identity_models_dir) as stack:
        clip = encode_video(marker_frames(10))
        mp4, info, progress = await stack.generate(clip, speech_wav(0.4), enhance=True)
        call = stack.stub.GenerateVideo(gateway_pb2.GenerateVideoRequest(
            options=gateway_pb2.GenerateOptions(enhance=True), face=clip, audio=speech_wav(0.4)), timeout=60)
        await call
        trailers_list = list(await call.trailing_metadata())
    messages = [p.message for p in progress if p.message]
    assert any("runs on CPU only" in m for m in messages), messages
    warnings = [value for key, value in trailers_list if key == "x-swl-warning"]
    assert any("runs on CPU only" in w for w in warnings), warnings
    assert info.frames == 10


# --- with the real detector (and recognition model) from ../shared/models -------------------------------------

@pytest.fixture(scope="module")
def real_stack_models(identity_models_dir, tmp_path_factory):
    """Real SCRFD (+ real MobileFaceNet when present) beside identity lip-sync and enhancer models."""
    shared_file(SHARED_MODELS, "scrfd_2.5g_bnkps.onnx")
    folder = tmp_path_factory.mktemp("real_stack")
    shutil.copy(identity_models_dir / "manifest.json", folder / "manifest.json")
    os.symlink(identity_models_dir / "dev", folder / "dev")
    for name in ("scrfd_2.5g_bnkps.onnx", "mobilefacenet_pixamatch.onnx"):
        if (SHARED_MODELS / name).is_file():
            os.symlink(SHARED_MODELS / name, folder / name)
    return folder


def recognition_model():
    return "mobilefacenet" if (SHARED_MODELS / "mobilefacenet_pixamatch.onnx").is_file() else "arcface_seed"


def two_faces(left_size=240, right_size=240):
    """Two different real people side by side on a grey canvas; returns the canvas and each face's area."""
    left = cv2.resize(cv2.imread(str(shared_file(SHARED_MEDIA, "face_people_0.png"))), (left_size, left_size))
    right = cv2.resize(cv2.imread(str(shared_file(SHARED_MEDIA, "face_astronaut.png"))), (right_size, right_size))
    canvas = np.full((360, 640, 3), 90, np.uint8)
    canvas[20 : 20 + left_size, 20 : 20 + left_size] = left
    canvas[40 : 40 + right_size, 380 : 380 + right_size] = right
    return canvas


async def run_job(stack, clip_frames, **options):
    """Runs a job up to the frames before encoding; returns the decoded input frames and (output, target)s."""
    clients = model_clients(stack)
    clients.open()
    clip = encode_video(clip_frames)
    try:
        job = LipSyncJob(clients, JobOptions(**options), GatewayMetrics(), chunk_frames=16)
        plan = await job.plan(clip, speech_wav(0.6))
        outputs = [(frame, target) async for frame, target in job.frames(plan)]
    finally:
        await clients.close()
    decoded, _ = decode_all(clip)
    return [decoded[plan.source_of(i, True)] for i in range(plan.frames)], outputs


def changed_pixels(output, source):
    return np.argwhere(np.abs(output.astype(int) - source.astype(int)).max(axis=2) > 0)


async def detected_boxes(stack, frame):
    clients = model_clients(stack)
    clients.open()
    try:
        job = LipSyncJob(clients, JobOptions(), GatewayMetrics(), chunk_frames=16)
        (faces,) = await job.planner.detect([frame])
    finally:
        await clients.close()
    return sorted((f.box for f in faces), key=lambda b: b[0])


def assert_changes_only_inside(sources, outputs, box, pads=(0, 10, 0, 0)):
    x1, y1, x2, y2 = box
    top, bottom, left, right = pads
    for index, ((output, target), source) in enumerate(zip(outputs, sources)):
        changed = changed_pixels(output, source)
        assert len(changed) > 0, f"frame {index}: nothing was synthesised"
        ys, xs = changed[:, 0], changed[:, 1]
        assert xs.min() >= x1 - left - 1 and xs.max() <= x2 + right + 1, f"frame {index}: change outside the box"
        assert ys.min() >= y1 - top - 1 and ys.max() <= y2 + bottom + 1, f"frame {index}: change outside the box"


async def test_reference_photo_picks_the_right_hand_person(real_stack_models):
    canvas = two_faces(260, 220)  # the left face is larger: only the reference can pick the right one
    clip = [canvas] * 15
    async with running_stack(real_stack_models, overrides={"detector": {"recognition_model": recognition_model()}}) as stack:
        left_box, right_box = await detected_boxes(stack, canvas)
        x1, y1, x2, y2 = right_box.astype(int)
        reference = encode_png(canvas[y1:y2, x1:x2].copy())  # cut from the same pixels as the target
        sources, outputs = await run_job(stack, clip, reference_face=reference)
    assert len(outputs) == 15
    assert_changes_only_inside(sources, outputs, right_box)


async def test_without_a_reference_the_largest_face_is_animated(real_stack_models):
    canvas = two_faces(260, 220)
    async with running_stack(real_stack_models, overrides={"detector": {"recognition_model": recognition_model()}}) as stack:
        left_box, _ = await detected_boxes(stack, canvas)
        sources, outputs = await run_job(stack, [canvas] * 15)
    assert_changes_only_inside(sources, outputs, left_box)


async def test_reference_of_someone_else_fails_or_keeps_frames(real_stack_models):
    shared_file(SHARED_MODELS, "mobilefacenet_pixamatch.onnx")  # generated weights cannot tell people apart
    canvas = two_faces()
    stranger = shared_file(SHARED_MEDIA, "talking_mpeg4_512_25fps_8s.mp4")
    first_frame = cv2.VideoCapture(str(stranger)).read()[1]
    reference = encode_png(first_frame)
    async with running_stack(real_stack_models, overrides={"detector": {"recognition_model": "mobilefacenet"}}) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.generate(encode_video([canvas] * 10), speech_wav(0.4), reference_face=reference)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "reference person is not in frame 0" in error.value.details()
        sources, outputs = await run_job(stack, [canvas] * 10, reference_face=reference, keep_frames_without_face=True)
    assert all(target is None for _, target in outputs)
    assert all(np.array_equal(output, source) for (output, _), source in zip(outputs, sources))


async def test_real_detector_box_matches_a_hand_measured_box(real_stack_models):
    photo = cv2.imread(str(shared_file(SHARED_MEDIA, "face_people_0.png")))
    hand_measured = np.array([150, 80, 315, 265])  # cheek to cheek, brow-line to chin, read off a 25 px grid
    async with running_stack(real_stack_models) as stack:
        (box,) = await detected_boxes(stack, photo)
    from gateway.tracking import iou
    assert iou(box, hand_measured) > 0.7


def test_degenerate_landmarks_are_a_failed_precondition_not_a_crash():
    frame = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(FailedPrecondition, match="degenerate"):
        align_face(frame, np.full((5, 2), 20.0, np.float32))


def jumping_clip(count=20, jump_at=8, a=(40, 80), b=(220, 80)):
    """A marker face that jumps from `a` to `b` at frame `jump_at` (a cut or a fast head turn)."""
    return [with_marker(scene(320, 240, seed=i), *(a if i < jump_at else b)) for i in range(count)]


async def plan_of(stack, clip, **options):
    from gateway.face_source import FaceSource
    from gateway.metrics import GatewayMetrics
    from gateway.options import JobOptions
    from gateway.planning import Planner

    clients = model_clients(stack)
    clients.open()
    metrics = GatewayMetrics()
    try:
        planner = Planner(clients, JobOptions(**options), metrics, chunk_frames=6)  # the gap spans two chunks
        plan = await planner.plan(FaceSource(encode_video(clip), still_fps=25))
    finally:
        await clients.close()
    return plan, metrics.registry.get_sample_value("swl_gateway_redetected_frames_total")


async def test_detect_every_k_re_detects_the_frames_between_when_the_face_jumps(dev_models_dir, monkeypatch):
    clip = jumping_clip()
    async with running_stack(dev_models_dir) as stack:
        plan, redetected = await plan_of(stack, clip, detect_every=5, smoothing_window=0)
        monkeypatch.setattr("gateway.planning.drifted", lambda before, after: False)
        blind, _ = await plan_of(stack, clip, detect_every=5, smoothing_window=0)
    centre_x = [float(t.box[0] + t.box[2]) / 2 for t in plan.targets]
    blind_x = [float(t.box[0] + t.box[2]) / 2 for t in blind.targets]
    marker_x = [40 + 36 if i < 8 else 220 + 36 for i in range(20)]
    # Frames 6-9 lie between the detections at 5 (before the jump) and 10 (after it).
    assert redetected == 4
    assert all(abs(c - m) <= 36 for c, m in zip(centre_x, marker_x)), (centre_x, marker_x)
    assert max(abs(blind_x[i] - marker_x[i]) for i in range(6, 10)) > 60  # interpolation alone misses the face


async def test_the_last_frame_is_detected_when_the_clip_ends_on_a_chunk_boundary(dev_models_dir):
    """24 frames in chunks of 6 with k=5: detections at 0, 5, ..., 20 and at 23, so the tail is interpolated."""
    async with running_stack(dev_models_dir) as stack:
        plan, _ = await plan_of(stack, marker_frames(24), detect_every=5)
    assert len(plan.targets) == 24 and all(t is not None for t in plan.targets)
