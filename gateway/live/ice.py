"""The STUN and TURN servers of live WebRTC sessions, with short-lived TURN credentials (coturn's REST API scheme)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field

from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.rtcicetransport import connection_kwargs, parse_stun_turn_uri
from superwav2lip.live.v1 import live_pb2

from service_runtime.settings import SettingsError

URLS_SETTING, SECRET_SETTING = "SWL_GATEWAY_LIVE_ICE_SERVERS", "SWL_GATEWAY_LIVE_TURN_SECRET"
RELAY_ONLY_SETTING = "SWL_GATEWAY_LIVE_ICE_RELAY_ONLY"


def turn_credentials(secret: str, name: str, ttl_s: float, now: float) -> tuple[str, str, int]:
    """A TURN username and password that a TURN server sharing `secret` accepts until the returned expiry (Unix
    seconds): username "<expiry>:<name>", password base64(HMAC-SHA1(secret, username)), as coturn's
    `use-auth-secret` (and the IETF draft "A REST API for access to TURN services") define them."""
    expiry = int(now + ttl_s)
    username = f"{expiry}:{name}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password, expiry


def checked_urls(urls: tuple[str, ...], secret: str) -> tuple[str, ...]:
    """The configured ICE server URLs, each one a valid stun:, stuns:, turn: or turns: URI; a TURN URL needs the
    shared secret (and the secret a TURN URL). Refusals name the setting and what to write."""
    for url in urls:
        try:
            scheme = parse_stun_turn_uri(url)["scheme"]
        except ValueError:
            raise SettingsError(f"{URLS_SETTING}: {url!r} is not a STUN or TURN URL (write stun:host:port or "
                                "turn:host:port?transport=udp, comma-separated)") from None
        if scheme.startswith("turn") and not secret:
            raise SettingsError(f"{URLS_SETTING} names the TURN server {url!r} but {SECRET_SETTING} is not set: "
                                "set it to the TURN server's static-auth-secret (coturn's use-auth-secret)")
    if secret and not any(url.startswith("turn") for url in urls):
        raise SettingsError(f"{SECRET_SETTING} is set but {URLS_SETTING} names no TURN server (turn: or turns:)")
    return urls


@dataclass(frozen=True)
class IceServers:
    """What a live peer connection gathers its candidates with: the same servers for the gateway's side and, through
    Live/IceServers, for the browser's, each caller with TURN credentials of its own. With none configured, host
    candidates only (a browser on the gateway's network)."""

    urls: tuple[str, ...] = ()
    turn_secret: str = field(default="", repr=False)
    credential_ttl_s: float = 3600.0
    relay_only: bool = False  # the gateway's side offers relay candidates only: its own addresses never leave

    @classmethod
    def from_settings(cls, settings) -> IceServers:
        if settings.live_ice_relay_only and not settings.live_turn_secret:
            raise SettingsError(f"{RELAY_ONLY_SETTING} needs a TURN server: set {URLS_SETTING} and {SECRET_SETTING}")
        ice = cls(checked_urls(settings.live_ice_servers, settings.live_turn_secret), settings.live_turn_secret,
                  settings.live_turn_credential_ttl_s, settings.live_ice_relay_only)
        if ice.relay_only and "turn_server" not in connection_kwargs(ice.configuration("-").iceServers or []):
            raise SettingsError(f"{RELAY_ONLY_SETTING}: none of {URLS_SETTING}'s TURN URLs is one this gateway can use "
                                "(turn: over udp or tcp, turns: over tcp)")
        return ice

    def for_caller(self, name: str, now: float | None = None) -> live_pb2.IceServersResponse:
        """The servers for one caller (a tenant's name goes into its TURN username, so the TURN server's logs can
        tell tenants apart; the username also carries the expiry, so it is no key for per-user quotas)."""
        now = time.time() if now is None else now
        stun = [url for url in self.urls if url.startswith("stun")]
        turn = [url for url in self.urls if url.startswith("turn")]
        servers = [live_pb2.IceServer(urls=stun)] if stun else []
        expiry = 0
        if turn:
            username, password, expiry = turn_credentials(self.turn_secret, name, self.credential_ttl_s, now)
            servers.append(live_pb2.IceServer(urls=turn, username=username, credential=password))
        return live_pb2.IceServersResponse(ice_servers=servers, expires_unix=expiry)

    def configuration(self, name: str) -> RTCConfiguration:
        """The gateway side's configuration for one peer connection (aiortc's)."""
        servers = [RTCIceServer(urls=list(s.urls), username=s.username or None, credential=s.credential or None)
                   for s in self.for_caller(name).ice_servers]
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)
