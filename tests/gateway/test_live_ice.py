"""The ICE servers of live WebRTC sessions: TURN credentials as coturn checks them, settings refused with what to
write, and Live/IceServers per tenant, over gRPC and through a real Envoy as the browser's JSON."""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import urllib.request

import grpc
import pytest
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from gateway.live.ice import IceServers, turn_credentials
from gateway.service import GatewaySettings
from service_runtime.settings import SettingsError
from webui.live import LiveBackend
from webui.settings import WebUISettings

from tests.support.envoy import envoy_in_front
from tests.support.stack import running_stack
from tests.support.tenants import tenants_file

SECRET = "turn-shared-secret"
TURN = "turn:turn.example.com:3478?transport=udp"


def test_turn_credentials_are_coturns_rest_api_ones():
    """coturn (use-auth-secret) accepts username "<expiry>:<anything>" with password base64(HMAC-SHA1(secret,
    username)) until the expiry: computed here from that definition, apart from the code under test."""
    username, password, expiry = turn_credentials(SECRET, "acme", 600, now=1_700_000_000.7)
    assert (username, expiry) == ("1700000600:acme", 1_700_000_600)
    assert base64.b64decode(password) == hmac.new(SECRET.encode(), b"1700000600:acme", hashlib.sha1).digest()


@pytest.mark.parametrize("environment, named, advice", [
    ({"SWL_GATEWAY_LIVE_ICE_SERVERS": "turn.example.com:3478"}, "SWL_GATEWAY_LIVE_ICE_SERVERS", "turn:host:port"),
    ({"SWL_GATEWAY_LIVE_ICE_SERVERS": "http://turn.example.com"}, "SWL_GATEWAY_LIVE_ICE_SERVERS", "stun:host:port"),
    ({"SWL_GATEWAY_LIVE_ICE_SERVERS": TURN}, "SWL_GATEWAY_LIVE_TURN_SECRET", "static-auth-secret"),
    ({"SWL_GATEWAY_LIVE_ICE_SERVERS": "stun:stun.example.com:3478", "SWL_GATEWAY_LIVE_TURN_SECRET": SECRET},
     "SWL_GATEWAY_LIVE_TURN_SECRET", "names no TURN server"),
    ({"SWL_GATEWAY_LIVE_ICE_RELAY_ONLY": "true"}, "SWL_GATEWAY_LIVE_ICE_RELAY_ONLY", "needs a TURN server"),
    ({"SWL_GATEWAY_LIVE_ICE_SERVERS": "turns:turn.example.com:443?transport=udp", "SWL_GATEWAY_LIVE_TURN_SECRET": SECRET,
      "SWL_GATEWAY_LIVE_ICE_RELAY_ONLY": "true"}, "SWL_GATEWAY_LIVE_ICE_RELAY_ONLY", "turns: over tcp"),
])
def test_ice_settings_that_cannot_work_are_refused_at_start_with_what_to_write(environment, named, advice):
    with pytest.raises(SettingsError) as refused:
        IceServers.from_settings(GatewaySettings.from_env(environment))
    assert named in str(refused.value) and advice in str(refused.value), refused.value


def test_the_turn_secret_never_shows_in_a_repr():
    settings = GatewaySettings.from_env({"SWL_GATEWAY_LIVE_ICE_SERVERS": TURN, "SWL_GATEWAY_LIVE_TURN_SECRET": SECRET})
    assert SECRET not in repr(settings) and "live_ice_servers" in repr(settings)
    assert SECRET not in repr(IceServers.from_settings(settings)) and TURN in repr(IceServers.from_settings(settings))


def test_stun_and_turn_are_handed_out_apart_with_credentials_for_turn_only():
    ice = IceServers(("stun:stun.example.com:3478", TURN, "turns:turn.example.com:443?transport=tcp"), SECRET, 600)
    servers = ice.for_caller("acme", now=1_000.0)
    stun, turn = servers.ice_servers
    assert list(stun.urls) == ["stun:stun.example.com:3478"] and not stun.username and not stun.credential
    assert list(turn.urls) == [TURN, "turns:turn.example.com:443?transport=tcp"]
    assert (turn.username, servers.expires_unix) == ("1600:acme", 1600)
    assert not IceServers().for_caller("acme").ice_servers  # none configured: host candidates only


async def test_each_tenant_gets_turn_credentials_of_its_own_over_grpc_and_as_json_through_envoy(dev_models_dir,
                                                                                                tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.audit")
    path = tenants_file(tmp_path, acme={"key": "acme-key-0001"}, other={"key": "other-key-0002"})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False,
                             live_ice_servers=("stun:stun.example.com:3478", TURN), live_turn_secret=SECRET) as stack:
        live = live_pb2_grpc.LiveStub(stack.channel)
        names = []
        for key in ("acme-key-0001", "other-key-0002"):
            servers = await live.IceServers(live_pb2.IceServersRequest(), metadata=(("x-api-key", key),), timeout=10)
            username = servers.ice_servers[1].username
            names.append(username.split(":", 1)[1])
            assert base64.b64decode(servers.ice_servers[1].credential) == hmac.new(
                SECRET.encode(), username.encode(), hashlib.sha1).digest()
        assert names == ["acme", "other"]
        audit = [(r.tenant, r.method, r.action, r.outcome) for r in caplog.records if r.name == "gateway.audit"]
        assert audit == [("acme", "IceServers", "credentials", "OK"), ("other", "IceServers", "credentials", "OK")]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await live.IceServers(live_pb2.IceServersRequest(), timeout=10)  # TURN credentials need a key
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ui = LiveBackend(WebUISettings(gateway_address=stack.address("gateway")))
        page = json.loads(await asyncio.to_thread(ui.ice_servers, "acme-key-0001"))  # the web UI's, for its page
        assert [s["urls"] for s in page["iceServers"]] == [["stun:stun.example.com:3478"], [TURN]]
        assert "username" not in page["iceServers"][0] and page["iceServers"][1]["username"].endswith(":acme")
        assert await asyncio.to_thread(ui.ice_servers, "no such key") == ""  # the offer then says what is wrong
        async with envoy_in_front(stack, tmp_path) as edge:
            def get() -> dict:  # in a thread: the gateway answering runs on this event loop
                request = urllib.request.Request(f"{edge}/v1/live:iceServers", headers={"x-api-key": "acme-key-0001"})
                with urllib.request.urlopen(request, timeout=10) as reply:
                    return json.load(reply)

            body = await asyncio.to_thread(get)
    # The edge's JSON keeps the proto's field names: a page passes {iceServers: body.ice_servers} to its
    # RTCPeerConnection (empty strings are no credentials to a browser).
    stun, turn = body["ice_servers"]
    assert stun["urls"] == ["stun:stun.example.com:3478"] and not stun["username"] and not stun["credential"]
    assert turn["urls"] == [TURN] and turn["username"].endswith(":acme") and turn["credential"]
    assert turn["username"] == f"{body['expires_unix']}:acme"
