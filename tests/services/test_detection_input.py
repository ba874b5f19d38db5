"""The detector's input follows the sent frame: its aspect kept, its size never raised, sides multiples of 32."""

import numpy as np
import pytest
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc

from service_runtime.images import encode_image
from services.detector.model import fit_to_stride, letterbox
from services.detector.service import DetectorService, DetectorSettings

from tests.support.inprocess import local_settings, started
from tests.support.media_factory import scene, with_marker


@pytest.mark.parametrize("size,longest,expected", [
    ((1280, 720), 640, (384, 640)),  # 16:9 at 640: 384x640, 60% of the square's pixels
    ((640, 360), 640, (384, 640)),
    ((360, 640), 640, (640, 384)),  # portrait
    ((320, 180), 640, (192, 320)),  # smaller than the limit: never scaled up
    ((1920, 1080), 320, (192, 320)),  # max_detection_size 320 really costs a quarter
])
def test_the_input_keeps_the_aspect_and_rounds_up_to_the_stride(size, longest, expected):
    frame = np.zeros((size[1], size[0], 3), np.uint8)
    canvas, scale = fit_to_stride(frame, longest)
    assert canvas.shape[:2] == expected and canvas.shape[0] % 32 == canvas.shape[1] % 32 == 0
    assert scale == pytest.approx(max(1.0, max(size) / longest))
    square, _ = letterbox(frame, longest)
    assert square.shape[:2] == (longest, longest)  # the seed's way, kept as an option


def test_the_frame_sits_at_the_top_left_and_the_scale_maps_back():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[300:340, 600:680] = 255
    canvas, scale = fit_to_stride(frame, 640)
    ys, xs = np.nonzero(canvas[..., 0] > 127)
    assert abs(xs.min() * scale - 600) <= 2 and abs(ys.min() * scale - 300) <= 2
    assert not canvas[360:].any()  # padding below the picture


async def test_frames_of_different_aspects_in_one_call_each_get_their_own_boxes(dev_models_dir):
    wide = with_marker(scene(640, 360), 400, 180)
    tall = with_marker(scene(360, 640), 180, 400)
    square = with_marker(scene(480, 480), 240, 240)
    service = DetectorService(local_settings(DetectorSettings, dev_models_dir))
    async with started(service) as (_, channel):
        stub = detector_pb2_grpc.DetectorStub(channel)
        together = (await stub.Detect(detector_pb2.DetectRequest(
            frames=[encode_image(f) for f in (wide, tall, square, wide)]))).frames
        alone = [(await stub.Detect(detector_pb2.DetectRequest(frames=[encode_image(f)]))).frames[0]
                 for f in (wide, tall, square, wide)]
    boxes = [[(f.x1, f.y1, f.x2, f.y2) for f in frame.faces] for frame in together]
    assert boxes == [[(f.x1, f.y1, f.x2, f.y2) for f in frame.faces] for frame in alone]
    assert all(boxes) and boxes[0] == boxes[3] and boxes[0] != boxes[1]


async def test_frames_past_the_pixel_cap_are_refused_from_their_header_before_decoding(dev_models_dir):
    """A 2000x2000 PNG of one colour is a few KB that would decode to 12 MB: refused from its header, naming the
    setting; raw BGR by its declared size; a frame within the cap in the same call is still detected."""
    import cv2
    from superwav2lip.common.v1 import media_pb2

    bomb = media_pb2.Image(data=cv2.imencode(".png", np.zeros((2000, 2000, 3), np.uint8))[1].tobytes(),
                           format=media_pb2.PIXEL_FORMAT_ENCODED)
    raw = media_pb2.Image(data=b"\0" * (1200 * 1000 * 3), width=1200, height=1000, format=media_pb2.PIXEL_FORMAT_BGR24)
    small = encode_image(with_marker(scene(640, 360), 400, 180))
    service = DetectorService(local_settings(DetectorSettings, dev_models_dir, max_frame_pixels=1000 * 1000))
    async with started(service) as (_, channel):
        stub = detector_pb2_grpc.DetectorStub(channel)
        frames = (await stub.Detect(detector_pb2.DetectRequest(frames=[bomb, raw, small]))).frames
        embedded = (await stub.Embed(detector_pb2.EmbedRequest(faces=[bomb]))).embeddings
    for refused, size in ((frames[0].error, "2000x2000"), (frames[1].error, "1200x1000"), (embedded[0].error, "2000x2000")):
        assert refused.code == 3 and size in refused.message and "SWL_DETECTOR_MAX_FRAME_PIXELS" in refused.message
    assert frames[2].faces and not frames[2].HasField("error")
