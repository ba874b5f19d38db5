"""Every checked-in fuzz input (the seed corpus and each crash a fuzz run found, kept under fuzz/regressions)
replayed through its target: none may raise. The targets themselves are tested to catch what they must."""


import numpy as np
import pytest

from fuzz import targets
from service_runtime.errors import InvalidArgument, ServiceError, Unavailable

from tests.support.paths import ROOT

FUZZ = ROOT / "fuzz"
INPUTS = sorted((target, path) for target in targets.TARGETS
                for folder in (FUZZ / "corpus" / target, FUZZ / "regressions" / target) if folder.is_dir()
                for path in folder.iterdir())


@pytest.mark.parametrize("target,path", INPUTS, ids=[f"{t}/{p.parent.name}/{p.name[:12]}" for t, p in INPUTS])
def test_checked_in_input_passes_its_target(target, path):
    targets.TARGETS[target](path.read_bytes())


def test_every_target_has_seeds():
    assert {t for t, _ in INPUTS} == set(targets.TARGETS)


def test_a_target_reports_internal_errors_and_unexpected_exceptions_but_not_client_errors():
    def raising(error):
        def call():
            raise error
        return call

    assert targets._expect_client_error(raising(InvalidArgument("face: not a video"))) is None
    for error in (ServiceError("boom"), Unavailable("down"), InvalidArgument(" ")):
        with pytest.raises(targets.Finding):
            targets._expect_client_error(raising(error))
    with pytest.raises(ZeroDivisionError):
        targets._expect_client_error(raising(ZeroDivisionError()))


def test_detector_decoders_drop_non_finite_faces():
    """Found by `make fuzz` (detector_outputs): an infinite box distance gave an infinite face."""
    from services.detector.decoders import decode_scrfd

    height = width = 32
    outputs = [np.full((c * 2, k), v, np.float32) for k, v in ((1, 0.9), (4, 1.0), (10, 0.5))
               for c in ((height // 8) * (width // 8), (height // 16) * (width // 16), 1)]
    outputs[3][0, 2] = np.inf  # the first anchor's right edge
    outputs[6][1, 0] = np.nan  # the second anchor's first keypoint
    found = decode_scrfd(outputs, height, width)
    assert len(found.boxes) > 0 and np.isfinite(found.boxes).all() and np.isfinite(found.landmarks).all()


@pytest.mark.parametrize("channels", [8, 37])
def test_speech_with_many_channels_is_their_mean_not_a_crash(channels):
    """Found by `make fuzz` (speech): a WAV claiming 37 channels crashed the process in PyAV's planar
    to_ndarray (8 or more planes). It is now decoded packed, and is simply the channels' mean."""
    import struct

    from gateway.audio import decode_speech

    samples = np.random.default_rng(channels).integers(-3000, 3000, (16000, channels)).astype("<i2")
    body = samples.tobytes()
    header = (b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " +
              struct.pack("<IHHIIHH", 16, 1, channels, 16000, 16000 * 2 * channels, 2 * channels, 16) +
              b"data" + struct.pack("<I", len(body)))
    decoded = decode_speech(header + body)
    expected = (samples.astype(np.float32) / 32768).mean(axis=1)
    assert decoded.channels == channels and np.allclose(decoded.samples, expected, atol=1e-6)
