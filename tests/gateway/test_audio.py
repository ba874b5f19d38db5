"""Audio decoding, Wav2Lip's mel spectrogram against an independent implementation, and window mapping."""

import io

import av
import numpy as np
import pytest

from gateway.audio import (
    MEL_STEPS, SILENCE, decode_speech, frame_count, mel_window, melspectrogram, window_start,
)
from service_runtime.errors import InvalidArgument

from tests.support.paths import SHARED_MEDIA, shared_file


def slaney_mel_filterbank(sr=16000, n_fft=800, n_mels=80, fmin=55.0, fmax=7600.0):
    """Slaney-style mel filters written from the definition (linear below 1 kHz, log above, area-normalised)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, float)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.linspace(0, sr / 2, 1 + n_fft // 2)
    lower = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    upper = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def reference_mel(wav):
    """Wav2Lip's hparams and formulas with a numpy STFT (reflect-padded, periodic Hann)."""
    y = np.append(wav[0], wav[1:] - 0.97 * wav[:-1])
    padded = np.pad(y, 400, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 800)
    frames = np.stack([padded[i : i + 800] * window for i in range(0, len(padded) - 800 + 1, 200)])
    magnitude = np.abs(np.fft.rfft(frames, axis=1)).T
    db = 20 * np.log10(np.maximum(1e-5, slaney_mel_filterbank() @ magnitude)) - 20
    return np.clip(8 * (db + 100) / 100 - 4, -4, 4)


def reference_chunks(mel_length, fps):
    """Rudrabha/Wav2Lip inference.py's loop: starts of the windows it makes, the last one pinned to the end."""
    starts, i = [], 0
    while True:
        start = int(i * (80.0 / fps))
        if start + 16 > mel_length:
            starts.append(mel_length - 16)
            return starts
        starts.append(start)
        i += 1


def test_mel_of_real_speech_matches_an_independent_implementation():
    speech = decode_speech(shared_file(SHARED_MEDIA, "speech_en_9s.wav").read_bytes())
    ours = melspectrogram(speech.samples)
    reference = reference_mel(speech.samples.astype(np.float64))
    assert ours.shape == reference.shape == (80, 1 + len(speech.samples) // 200)
    assert np.abs(ours - reference).max() < 1e-4


def test_mel_of_a_generated_tone_matches_without_shared_media():
    t = np.arange(16000 * 2) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    assert np.abs(melspectrogram(wav) - reference_mel(wav.astype(np.float64))).max() < 1e-4


def _encode(samples: np.ndarray, rate: int, codec: str, fmt: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([samples, samples]).astype(np.int16)[None].reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def test_decode_resamples_stereo_48k_to_mono_16k_with_the_same_duration():
    samples = (np.sin(np.arange(48000 * 3) / 10) * 8000).astype(np.int16)
    speech = decode_speech(_encode(samples, 48000, "pcm_s16le", "wav"))
    assert abs(speech.seconds - 3.0) < 0.01


def test_real_mp3_decodes_to_the_wav_duration():
    wav = decode_speech(shared_file(SHARED_MEDIA, "speech_en_9s.wav").read_bytes())
    mp3 = decode_speech(shared_file(SHARED_MEDIA, "speech_en_9s_48k_stereo.mp3").read_bytes())
    assert abs(wav.seconds - mp3.seconds) < 0.06


@pytest.mark.parametrize("data, message", [(b"", "no bytes"), (b"\x00garbage" * 50, "FFmpeg can read")])
def test_bad_audio_is_invalid_argument(data, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_speech(data)


def test_audio_shorter_than_one_mel_step_is_refused():
    with pytest.raises(InvalidArgument, match="shorter than one Wav2Lip window"):
        decode_speech(_encode(np.zeros(100, np.int16), 16000, "pcm_s16le", "wav"))


@pytest.mark.parametrize("fps", [25.0, 30000 / 1001, 30.0])
@pytest.mark.parametrize("seconds", [4.2, 8.9])
def test_windows_match_the_reference_and_cover_the_whole_speech(fps, seconds):
    mel_length = 1 + int(seconds * 16000) // 200
    reference = reference_chunks(mel_length, fps)
    ours = [window_start(i, fps) for i in range(frame_count(seconds, fps))]
    # Every window the reference makes from a full slice starts where ours does.
    assert ours[: len(reference) - 1] == reference[:-1]
    # The reference ends early (its last window is pinned to the end of the mel); we cover the audio.
    assert frame_count(seconds, fps) == round(seconds * fps)
    assert len(ours) > len(reference) - 1
    missing_ms = (frame_count(seconds, fps) - len(reference)) / fps * 1000
    assert 80 <= missing_ms <= 200  # what the reference loses at the end of every clip


def test_windows_past_the_end_are_padded_with_silence():
    mel = np.zeros((80, 20), np.float32)
    window = mel_window(mel, 2, 25.0)  # starts at 6: 14 real steps, 2 padded
    assert window.shape == (80, MEL_STEPS)
    assert (window[:, :14] == 0).all() and (window[:, 14:] == SILENCE).all()
