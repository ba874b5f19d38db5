"""What the gateway takes from clients and from Redis before it acts on it: a webhook URL, checked at submission
and again at delivery, a job id before it names a folder, and each frame's size before it is decoded (issue #26's first findings)."""

import asyncio
import io

import av
import numpy as np
import pytest
import soundfile

from gateway.audio import decode_speech
from gateway.face_source import FaceSource
from gateway.job_store import JobRecord
from gateway.jobs import JobFiles
from gateway.limits import MediaLimits
from gateway.metrics import GatewayMetrics
from gateway.service import GatewaySettings
from gateway.servicer import EVENTS_QUEUED, progress_queue
from gateway.tenants import Tenant, TenantRegistry
from gateway.webhooks import TenantWebhooks, WebhookSender, WebhookTerms, check_webhook
from service_runtime.errors import InvalidArgument

from tests.support.media_factory import encode_video
from tests.support.webhook_receiver import webhook_receiver

TERMS = WebhookTerms(("hooks.example", "127.0.0.1:9000"), "secret", "the tenants file")


@pytest.mark.parametrize("url", ["http://hooks.example:99999/hook", "http://hooks.example:-1/hook",
                                 "http://hooks.example:http/hook", "http://[::1/hook"])
def test_a_malformed_url_is_invalid_argument_not_a_crash(url):
    with pytest.raises(InvalidArgument, match="webhook_url"):
        check_webhook(url, TERMS)


def test_a_host_allowed_with_a_port_is_allowed_only_on_that_port():
    assert check_webhook("http://127.0.0.1:9000/hook", TERMS)
    with pytest.raises(InvalidArgument, match="allow-list"):
        check_webhook("http://127.0.0.1:9001/hook", TERMS)


async def test_delivery_checks_the_url_again_against_the_tenants_terms_now():
    """A record read back from Redis is not trusted, and a tenant's hosts may have changed since submission:
    a URL no longer allowed gets no POST."""
    settings = GatewaySettings.from_env({}, allow_anonymous=True, webhook_max_attempts=2, webhook_backoff_s=0.01)
    registry = TenantRegistry([Tenant("acme", (), webhook_secret="s", webhook_hosts=("hooks.example",))])
    sender = WebhookSender(settings, GatewayMetrics(), TenantWebhooks(registry, settings))
    with webhook_receiver(fail_first=0) as (url, received):
        record = JobRecord("job_" + "0" * 24, state="SUCCEEDED", webhook_url=url, tenant="acme")
        assert await sender.deliver(record) is False
    assert received == []


async def test_a_job_id_from_the_store_never_names_a_folder_outside_the_jobs_folder(tmp_path):
    """Ids come back from Redis, which a bug or an intruder may have written: only a real job id becomes a path."""
    victim = tmp_path / "data"
    victim.mkdir()
    (victim / "keep").write_text("another tenant's video")
    files = JobFiles(tmp_path / "volume")
    for claimed in (str(victim), "../data", "job_" + "0" * 23 + "/", ""):
        with pytest.raises(ValueError, match="not a job id"):
            await files.remove(claimed)
    assert (victim / "keep").read_text() == "another tenant's video"


def test_a_frame_larger_than_the_limit_midway_is_refused_before_it_is_converted():
    """A stream may change size midway (a second segment, a new SPS): each decoded frame's size is checked before
    it becomes pixels, not only the header's and the first frame's (an 8K frame is 100 MB as BGR)."""
    limits = MediaLimits(max_frame_pixels=320 * 240)
    source = FaceSource(encode_video([np.full((240, 320, 3), 90, np.uint8)] * 5), 25.0, limits)
    grown = av.VideoFrame.from_ndarray(np.zeros((480, 640, 3), np.uint8), format="bgr24")
    with pytest.raises(InvalidArgument, match="640x480"):
        source._pixels(grown)
    source.close()


def test_speech_at_a_high_declared_rate_gets_no_more_decoded_samples_than_48_khz_would():
    """The decode budget was the length limit times the rate the file declares: a 384 kHz FLAC held 24x the
    samples of the same length at 16 kHz. Past 48 kHz the length limit shrinks so the samples held stay the same."""
    limits = MediaLimits(max_audio_seconds=2.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(192_000 * 1, np.float32) + 0.1, 192_000, format="FLAC")  # 1 s at 192 kHz
    with pytest.raises(InvalidArgument, match="192000 Hz"):
        decode_speech(buffer.getvalue(), limits)
    ordinary = io.BytesIO()
    soundfile.write(ordinary, np.zeros(48_000, np.float32) + 0.1, 48_000, format="FLAC")  # 1 s at 48 kHz: fine
    assert decode_speech(ordinary.getvalue(), limits).seconds == pytest.approx(1.0)


async def test_a_client_that_stops_reading_holds_back_its_job_not_the_whole_video_in_the_gateway():
    """The events toward a streaming client (progress, video fragments) wait in a bounded queue: once it is full,
    the job waits for the client, instead of the gateway keeping every fragment of the video for it."""
    events, progress = progress_queue()

    async def job() -> None:
        for number in range(100):
            await events.put(b"fragment %d" % number)  # as Generation.run's on_video does

    running = asyncio.ensure_future(job())
    await asyncio.sleep(0.2)  # far longer than 100 puts take when nothing holds them back
    assert not running.done() and events.qsize() == EVENTS_QUEUED
    running.cancel()
