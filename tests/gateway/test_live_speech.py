"""A live utterance's speech: streamed mel windows against the whole file's."""

from fractions import Fraction

import numpy as np

from gateway.audio import SAMPLE_RATE, mel_window, melspectrogram
from gateway.live.speech import Utterance

from tests.support.live import speech


def test_streamed_windows_equal_the_whole_files():
    """Chunk by chunk, each frame's window is the one a whole-file job computes, once its speech has arrived."""
    pcm = speech(3.0)
    utterance = Utterance(SAMPLE_RATE, Fraction(25), start=0, first_chunk=1)
    whole = melspectrogram(pcm.astype(np.float32) / 32768.0)
    checked = 0
    for start in range(0, len(pcm), 1600):
        utterance.add(pcm[start : start + 1600])
        while utterance.window_ready(checked) and checked < 70:
            np.testing.assert_allclose(utterance.mel_window(checked), mel_window(whole, checked, 25.0), atol=1e-4)
            checked += 1
    utterance.end()
    assert utterance.frames == 75
    for k in range(checked, 75):
        np.testing.assert_allclose(utterance.mel_window(k), mel_window(whole, k, 25.0), atol=1e-4)
    assert checked >= 60  # most windows were final before the end was known
