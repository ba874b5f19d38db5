"""Media fidelity: variable-rate video on a constant grid, rotation applied, speech decoded as librosa and
Rudrabha/Wav2Lip do it."""

import io
from fractions import Fraction

import librosa
import librosa.filters
import numpy as np
import pytest
import soundfile
from scipy import signal

from gateway.audio import decode_speech, melspectrogram
from gateway.face_source import FaceSource

from tests.support.paths import SHARED_MEDIA, shared_file
from tests.support.media_factory import decode_all, encode_video, marker_frames, scene, speech_wav, stream_durations, with_display_matrix, with_marker
from tests.support.stack import running_stack

# 30 fps for 10 frames, then a frame every other slot (15 fps): 69 grid slots from 40 frames (the last frame
# lasts one 30 fps tick, as the muxer records it).
VFR_TICKS = list(range(10)) + [10 + 2 * k for k in range(30)]
EXPECTED_GRID = list(range(10)) + [10 + k // 2 for k in range(59)]


def nearest(frame: np.ndarray, references: list[np.ndarray]) -> int:
    """Which reference picture a decoded frame is (the test scenes differ everywhere, codecs blur a little)."""
    errors = [np.mean((frame.astype(np.int16) - r.astype(np.int16)) ** 2) for r in references]
    return int(np.argmin(errors))


def test_face_source_reads_exact_counts_on_the_nominal_grid_of_a_variable_rate_clip():
    frames = [scene(96, 64, seed=i) for i in range(40)]
    source = FaceSource(encode_video(frames, Fraction(30), ticks=VFR_TICKS), still_fps=25)
    assert source.fps == 30
    first_pass = []
    for start in range(0, 80, 16):
        chunk = source.read(start, start + 16)
        assert len(chunk) == max(0, min(16, len(EXPECTED_GRID) - start)), start  # exact, fewer only at the end
        first_pass += chunk
    assert [nearest(f, frames) for f in first_pass] == EXPECTED_GRID
    # Reading backwards (a seek) gives exactly the frames of the forward pass.
    again = source.read(21, 37)
    assert len(again) == 16 and all(np.array_equal(a, b) for a, b in zip(again, first_pass[21:37]))
    source.close()


@pytest.mark.parametrize("clockwise, turns", [(90, -1), (180, 2), (270, 1)])
def test_display_matrix_is_applied(clockwise, turns):
    frames = [scene(96, 64, seed=i) for i in range(3)]
    source = FaceSource(with_display_matrix(encode_video(frames), clockwise), still_fps=25)
    upright = [np.rot90(f, turns) for f in frames]
    assert source.size == (upright[0].shape[1], upright[0].shape[0])
    decoded = source.read(0, 3)
    assert [nearest(f, upright) for f in decoded] == [0, 1, 2]
    for frame, picture in zip(decoded, frames):  # far closer to the upright picture than to any other turn
        errors = {k: np.mean(np.abs(frame.astype(int) - np.rot90(picture, k))) for k in range(-1, 3)
                  if np.rot90(picture, k).shape == frame.shape}
        assert all(errors[turns] < errors[k] / 2 for k in errors if k != turns), errors
    source.close()


async def test_variable_rate_clip_comes_out_at_its_nominal_rate(identity_models_dir):
    frames = marker_frames(40, 256, 192)
    clip = encode_video(frames, Fraction(30), ticks=VFR_TICKS)
    async with running_stack(identity_models_dir) as stack:
        mp4, info, _ = await stack.generate(clip, speech_wav(2.0), crop_mode=1)  # box: pixels outside are kept
    decoded, rate = decode_all(mp4)
    durations = stream_durations(mp4)
    assert rate == 30 and info.fps == 30
    assert len(decoded) == info.frames == round(2.0 * 30)
    assert abs(durations["video"] - 2.0) <= 1 / 30 and abs(durations["audio"] - 2.0) <= 1 / 30
    assert [nearest(f, frames) for f in decoded] == EXPECTED_GRID[:60]


async def test_portrait_phone_clip_comes_out_upright(identity_models_dir):
    frames = [with_marker(scene(320, 240, seed=i), 60, 150) for i in range(10)]  # sideways, as the sensor saw it
    clip = with_display_matrix(encode_video(frames), 90)
    async with running_stack(identity_models_dir) as stack:
        mp4, info, _ = await stack.generate(clip, speech_wav(0.4), crop_mode=1)
    decoded, _ = decode_all(mp4)
    upright = [np.rot90(f, -1) for f in frames]
    assert (info.width, info.height) == (240, 320) and decoded[0].shape == (320, 240, 3)
    assert [nearest(f, upright) for f in decoded] == list(range(10))


# --- The reference's audio ---------------------------------------------------------------------------------------
# Rudrabha/Wav2Lip audio.py and hparams.py (master), copied as they are. Two lines are adapted to today's
# librosa, marked "adapted": librosa >= 0.10 takes keyword arguments only, and Wav2Lip's pinned librosa 0.7
# padded the STFT with reflection by default (today's default is zeros).
class hp:  # noqa: N801 - the reference's name
    num_mels = 80
    n_fft = 800
    hop_size = 200
    win_size = 800
    sample_rate = 16000
    signal_normalization = True
    allow_clipping_in_normalization = True
    symmetric_mels = True
    max_abs_value = 4.
    preemphasize = True
    preemphasis = 0.97
    min_level_db = -100
    ref_level_db = 20
    fmin = 55
    fmax = 7600


def preemphasis(wav, k, preemphasize=True):
    if preemphasize:
        return signal.lfilter([1, -k], [1], wav)
    return wav


def reference_melspectrogram(wav):
    D = _stft(preemphasis(wav, hp.preemphasis, hp.preemphasize))
    S = _amp_to_db(_linear_to_mel(np.abs(D))) - hp.ref_level_db

    if hp.signal_normalization:
        return _normalize(S)
    return S


def _stft(y):
    return librosa.stft(y=y, n_fft=hp.n_fft, hop_length=hp.hop_size, win_length=hp.win_size,
                        pad_mode="reflect")  # adapted


def _linear_to_mel(spectogram):
    return np.dot(_build_mel_basis(), spectogram)


def _build_mel_basis():
    assert hp.fmax <= hp.sample_rate // 2
    return librosa.filters.mel(sr=hp.sample_rate, n_fft=hp.n_fft, n_mels=hp.num_mels,  # adapted
                               fmin=hp.fmin, fmax=hp.fmax)


def _amp_to_db(x):
    min_level = np.exp(hp.min_level_db / 20 * np.log(10))
    return 20 * np.log10(np.maximum(min_level, x))


def _normalize(S):
    if hp.allow_clipping_in_normalization:
        if hp.symmetric_mels:
            return np.clip((2 * hp.max_abs_value) * ((S - hp.min_level_db) / (-hp.min_level_db)) - hp.max_abs_value,
                           -hp.max_abs_value, hp.max_abs_value)
        else:
            return np.clip(hp.max_abs_value * ((S - hp.min_level_db) / (-hp.min_level_db)), 0, hp.max_abs_value)


def load_wav(data: bytes, sr):
    """Wav2Lip's load_wav, `librosa.core.load(path, sr=sr)[0]`, on bytes instead of a path."""
    return librosa.core.load(io.BytesIO(data), sr=sr)[0]


def stereo_speech(rate: int, subtype: str, container: str) -> bytes:
    """Two different voiced tone sweeps with noise, as a stereo file of the given rate and sample width."""
    t = np.arange(int(rate * 2.5)) / rate
    rng = np.random.default_rng(rate)
    left = 0.5 * np.sin(2 * np.pi * (150 + 80 * np.sin(2 * np.pi * 3 * t)) * t)
    right = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([left, right], axis=1), rate, subtype=subtype, format=container)
    return buffer.getvalue()


def assert_matches_the_reference(data: bytes) -> None:
    expected = load_wav(data, hp.sample_rate)
    samples = decode_speech(data).samples
    assert len(samples) == len(expected)
    assert np.max(np.abs(samples - expected)) <= 1e-4
    assert np.max(np.abs(melspectrogram(samples) - reference_melspectrogram(samples))) <= 1e-3


@pytest.mark.parametrize("rate, subtype, container", [
    (44100, "PCM_16", "WAV"), (48000, "PCM_24", "WAV"), (44100, "PCM_16", "FLAC"), (48000, "PCM_24", "FLAC"),
])
def test_stereo_speech_matches_librosa_load_and_the_wav2lip_mel(rate, subtype, container):
    assert_matches_the_reference(stereo_speech(rate, subtype, container))


def test_stereo_is_the_mean_of_its_channels_not_a_louder_mix():
    """Both channels equal: the mono signal is that channel, not 1/sqrt(2) x their sum (3 dB too hot)."""
    mono = speech_wav(1.0, rate=16000)
    samples, rate = soundfile.read(io.BytesIO(mono), dtype="float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([samples, samples], axis=1), rate, subtype="PCM_16", format="WAV")
    assert np.array_equal(decode_speech(buffer.getvalue()).samples, decode_speech(mono).samples)


@pytest.mark.parametrize("name", ["speech_en_4s.wav", "speech_en_9s.wav", "speech_ja.wav", "speech_en_60s_16k.wav"])
def test_real_speech_matches_librosa_load_and_the_wav2lip_mel(name):
    assert_matches_the_reference(shared_file(SHARED_MEDIA, name).read_bytes())
