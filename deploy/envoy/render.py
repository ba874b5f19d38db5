"""Renders the Envoy edge config (JSON, which Envoy reads as YAML) from ports, addresses and limits.

One listener carries HTTP/1.1 JSON, HTTP/2 and native gRPC to the gateway. Every request's API key is checked
on its headers alone by the gateway's key-check endpoint (ext_authz) before any body is read or transcoded. The
gRPC-JSON transcoder is built from the descriptor set `make protos` writes; `/healthz` answers from Envoy's own
gRPC health checks of the gateway; the admin interface listens on loopback only; TLS is added when a certificate
and key are given.

    python -m deploy.envoy.render --listen-port 8080 --gateway 127.0.0.1:50051 -o .run/envoy.json
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.limits import http_body_limit_bytes

ROOT = Path(__file__).resolve().parent.parent.parent
DESCRIPTOR = ROOT / "generated" / "superwav2lip_descriptor.pb"
GATEWAY_SERVICE = "superwav2lip.gateway.v1.Gateway"  # fully qualified, or the transcoder refuses to start
LIVE_SERVICE = "superwav2lip.live.v1.Live"  # live sessions (gRPC) and the WebRTC offer (also POST /v1/live:offer)
API = "type.googleapis.com/envoy.extensions"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"  # routed; Health/Watch is not
# The HTTP routes whose body is raw media (google.api.HttpBody), not base64 in JSON: they keep the full upload
# limit. Matched on the path before transcoding (protos/superwav2lip/gateway/v1/gateway.proto).
RAW_MEDIA_PATHS = r"^/v1/(uploads|(uploads|avatars)/[^/]+:generate)$"
HTTP_API_PREFIX = "/v1/"  # every google.api.http path of the gateway's service starts so
KEY_HEADERS = ("x-api-key", "authorization")  # gateway/auth.py's: all ext_authz passes on to the key check
# /healthz answers 200 while at least this share of the gateway's hosts is healthy. Envoy truncates the share to
# a whole percent (so 0.1 is 0, which passes with no host healthy at all); 1% is "any one host" for up to 100.
MIN_HEALTHY_PERCENT = 1


@dataclass(frozen=True)
class EdgeConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    admin_port: int = 9901
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 50051
    authz_port: int = 9105  # the gateway's SWL_GATEWAY_AUTHZ_PORT, on the gateway's hosts
    authz_timeout_ms: int = 2000  # a key check that takes longer is refused (503), never allowed
    descriptor: str = str(DESCRIPTOR)
    max_upload_mb: int = 512  # the gateway's SWL_GATEWAY_MAX_UPLOAD_MB: raw media bodies (RAW_MEDIA_PATHS)
    # Largest JSON body (media as base64) the transcoder buffers: authenticated callers only, as the key is checked
    # first, but each one is held whole in Envoy's memory. Larger media go raw (/v1/uploads) or as native gRPC
    # streams (Generate, CreateAvatar), which Envoy forwards without buffering.
    max_json_body_mb: int = 16
    # Client connections Envoy holds at once (all listeners); beyond it new ones are closed on accept. Each idle
    # connection costs buffers and a file descriptor; a busy HTTP/2 one up to its 1 MiB window.
    max_downstream_connections: int = 4096
    route_timeout_s: int = 3600  # long jobs: an hour for one request, and the most any stream may last
    stream_idle_timeout_s: int = 300  # a request or answer that moves no byte for this long is reset
    connection_idle_timeout_s: int = 300  # a connection with no request in flight for this long is closed
    request_headers_timeout_s: int = 10  # a client must have sent all its headers within this
    # Hops in front of Envoy whose X-Forwarded-For entry is trusted (0: Envoy is the edge; 1 behind a cloud
    # load balancer that appends the client's address). Everyone else's x-request-id and XFF are not.
    xff_num_trusted_hops: int = 0
    # Circuit breakers toward the gateway cluster (all gateway pods together); beyond them Envoy answers 503
    # at once instead of queueing in memory. HTTP/2 multiplexes: about one connection per Envoy worker thread
    # and gateway pod; each gateway pod runs a few jobs at a time, but listings, uploads and job queries are
    # cheap, so the stream bound is generous and only stops floods.
    max_gateway_connections: int = 256
    max_gateway_pending_requests: int = 128
    max_gateway_requests: int = 1024
    max_gateway_retries: int = 3  # no retry policy is configured; bounded anyway
    # Requests each client address may make through each Envoy replica (a token bucket: this many a second, up to
    # the burst at once; an IPv6 client's whole /64 is one address), with or without a key, counted before the key
    # check: a flood from one address is answered 429 (RESOURCE_EXHAUSTED to gRPC) by Envoy alone and never queues
    # other callers' key checks behind its own. The address is the socket's,
    # or the X-Forwarded-For entry of a trusted hop (xff_num_trusted_hops): behind a load balancer that hides it,
    # every client shares one bucket. Up to max_tracked_clients addresses are tracked at once (least recent out).
    per_client_requests_per_s: int = 100
    per_client_burst: int = 200
    max_tracked_clients: int = 10000
    # The memory Envoy may use: its container's limit (1 GiB in deploy/k8s/base/envoy/deployment.yaml). The
    # overload manager shrinks the heap at 95% of it and answers every new request 503 at 98%, rather than
    # being killed for memory with every stream it holds.
    memory_limit_mib: int = 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    # Kubernetes: the descriptor travels inside the config (one ConfigMap key) instead of as a file path.
    embed_descriptor: bool = False

    @property
    def max_body_bytes(self) -> int:
        """The largest answer (a video), and the largest raw media body."""
        return http_body_limit_bytes(self.max_upload_mb)

    @property
    def max_json_body_bytes(self) -> int:
        return self.max_json_body_mb << 20


def render(config: EdgeConfig) -> dict:
    listener = {
        "name": "edge",
        "address": _address(config.listen_host, config.listen_port),
        "filter_chains": [{"filters": [_http_connection_manager(config)]}],
    }
    if config.tls_cert and config.tls_key:
        listener["filter_chains"][0]["transport_socket"] = _tls(config.tls_cert, config.tls_key)
    return {
        "admin": {"address": _address("127.0.0.1", config.admin_port)},
        "overload_manager": _overload_manager(config),
        "static_resources": {"listeners": [listener], "clusters": [_gateway_cluster(config), _authz_cluster(config)]},
    }


def _overload_manager(config: EdgeConfig) -> dict:
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [{"name": heap, "typed_config": {
            "@type": f"{API}.resource_monitors.fixed_heap.v3.FixedHeapConfig",
            "max_heap_size_bytes": config.memory_limit_mib << 20,
        }}, {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
            "@type": f"{API}.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": config.max_downstream_connections,
        }}],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap",
             "triggers": [{"name": heap, "threshold": {"value": 0.95}}]},
            {"name": "envoy.overload_actions.stop_accepting_requests",
             "triggers": [{"name": heap, "threshold": {"value": 0.98}}]},
        ],
    }


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _http_connection_manager(config: EdgeConfig) -> dict:
    timeout = f"{config.route_timeout_s}s"
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{API}.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "edge",
            "codec_type": "AUTO",  # HTTP/1.1 and HTTP/2 (native gRPC) on the same port
            # Envoy's edge-proxy guidance: timeouts for slow clients, the client's address from the socket.
            "request_headers_timeout": f"{config.request_headers_timeout_s}s",
            "stream_idle_timeout": f"{config.stream_idle_timeout_s}s",
            "common_http_protocol_options": {
                "idle_timeout": f"{config.connection_idle_timeout_s}s",
                "max_stream_duration": timeout,
                "headers_with_underscores_action": "REJECT_REQUEST",
            },
            "http2_protocol_options": {
                "max_concurrent_streams": 100,
                "initial_stream_window_size": 65536,  # 64 KiB (Envoy's default is 256 MiB)
                "initial_connection_window_size": 1048576,  # 1 MiB
            },
            "use_remote_address": True,
            "xff_num_trusted_hops": config.xff_num_trusted_hops,
            # Request ids are made here: a caller's own x-request-id never reaches the logs as its.
            "generate_request_id": True,
            "preserve_external_request_id": False,
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            "route_config": {"name": "gateway", "virtual_hosts": [{
                "name": "gateway", "domains": ["*"],
                # Routes match the path after transcoding: every call is /superwav2lip.gateway.v1.Gateway/...
                # Nothing else reaches the gateway from outside but the unary health check: no Health/Watch
                # (a key-less stream held open for ever), no reflection. Any other path: Envoy answers 404
                # (UNIMPLEMENTED to a gRPC client) without calling the gateway.
                # Routes match a request as it arrives (the key check and the body limit read the route then), and
                # again after the transcoder has rewritten an HTTP call's path to its gRPC method's (the first).
                "routes": [
                    # Native gRPC streams flow through unbuffered.
                    {"match": {"prefix": f"/{GATEWAY_SERVICE}/"}, "route": {"cluster": "gateway", "timeout": timeout},
                     "typed_per_filter_config": _unbuffered()},
                    {"match": {"prefix": f"/{LIVE_SERVICE}/"}, "route": {"cluster": "gateway", "timeout": timeout},
                     "typed_per_filter_config": _unbuffered()},
                    # Probes carry no key (gateway/auth.py's OPEN_METHODS): no key check on the way.
                    {"match": {"path": HEALTH_CHECK_PATH}, "route": {"cluster": "gateway", "timeout": "5s"},
                     "typed_per_filter_config": {**_unbuffered(), **_unchecked()}},
                    # The HTTP API. Raw media bodies: the transcoder holds them whole, up to the upload limit.
                    # JSON bodies: the buffer filter, up to max_json_body_mb. A path the transcoder does not map
                    # gets its 404 (reject_unknown_method), so nothing but gateway calls reaches the gateway.
                    {"match": {"safe_regex": {"regex": RAW_MEDIA_PATHS}},
                     "route": {"cluster": "gateway", "timeout": timeout}, "typed_per_filter_config": _unbuffered()},
                    {"match": {"prefix": HTTP_API_PREFIX}, "route": {"cluster": "gateway", "timeout": timeout}},
                    # Anything else (Health/Watch, reflection, other paths): 404, UNIMPLEMENTED to gRPC, unread
                    # and unchecked (a key-less flood of them costs the key check nothing).
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404},
                     "typed_per_filter_config": {**_unbuffered(), **_unchecked()}},
                ],
            }]},
            # In this order: /healthz answers at once; then each client address's rate is limited; then the key is
            # checked on the headers alone (ext_authz checks requests that have a route to a cluster), before any
            # body is buffered, so a key-less 600 MiB post costs Envoy nothing; then a JSON body is buffered within
            # its limit and transcoded.
            "http_filters": [_health_check(), _per_client_rate(config), _key_check(config), _json_body_limit(config),
                             _transcoder(config), {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{API}.filters.http.router.v3.Router"},
            }],
        },
    }


def _health_check() -> dict:
    """GET /healthz: 200 while Envoy's gRPC health checks find at least one gateway host SERVING, 503 otherwise,
    so that one slow or draining pod does not take the whole edge out of its load balancer."""
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": f"{API}.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
            "cluster_min_healthy_percentages": {"gateway": {"value": MIN_HEALTHY_PERCENT}},
        },
    }


def _per_client_rate(config: EdgeConfig) -> dict:
    """A token bucket per client address, IPv6 by /64 (a wildcard descriptor: one bucket for each address seen,
    LRU-bounded); 429 with x-ratelimit headers beyond it. The filter's default bucket, which Envoy requires, is the
    same size and never consumed for a request that has an address, which is every request."""
    every = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "per_client_rate_enabled"}
    bucket = {"max_tokens": config.per_client_burst, "tokens_per_fill": config.per_client_requests_per_s,
              "fill_interval": "1s"}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": f"{API}.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "per_client",
            "token_bucket": bucket,
            "filter_enabled": every,
            "filter_enforced": {**every, "runtime_key": "per_client_rate_enforced"},
            # An IPv6 client holds a /64 and could rotate through it for fresh buckets: one bucket per /64.
            "rate_limits": [{"actions": [{"masked_remote_address": {"v4_prefix_mask_len": 32,
                                                                     "v6_prefix_mask_len": 64}}]}],
            "descriptors": [{"entries": [{"key": "masked_remote_address", "value": ""}],  # "": each its own
                             "token_bucket": bucket}],
            "max_dynamic_descriptors": config.max_tracked_clients,
            "always_consume_default_token_bucket": False,
            "rate_limited_as_resource_exhausted": True,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }


def _key_check(config: EdgeConfig) -> dict:
    """ext_authz on headers only (no `with_request_body`): the gateway's key check answers 200 or 401 (with its
    JSON error, passed to the client); when it is down, slow or refuses to answer, the request gets 503, never
    through (failure_mode_allow false)."""
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": f"{API}.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "http_service": {"server_uri": {"uri": f"http://{config.gateway_host}:{config.authz_port}",
                                            "cluster": "authz", "timeout": f"{config.authz_timeout_ms / 1000:g}s"}},
            "allowed_headers": {"patterns": [{"exact": name} for name in KEY_HEADERS]},
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
        },
    }


def _json_body_limit(config: EdgeConfig) -> dict:
    """The JSON body limit: the whole body within max_json_body_mb (413 beyond), where routes do not turn it off.
    The transcoder's own max_request_body_size bounds only the JSON it has not yet converted, not the body."""
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": f"{API}.filters.http.buffer.v3.Buffer",
                         "max_request_bytes": config.max_json_body_bytes},
    }


def _unchecked() -> dict:
    return {"envoy.filters.http.ext_authz": {"@type": f"{API}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                                             "disabled": True}}


def _unbuffered() -> dict:
    return {"envoy.filters.http.buffer": {"@type": f"{API}.filters.http.buffer.v3.BufferPerRoute", "disabled": True}}


def _transcoder(config: EdgeConfig) -> dict:
    descriptor = ({"proto_descriptor_bin": base64.b64encode(Path(config.descriptor).read_bytes()).decode()}
                  if config.embed_descriptor else {"proto_descriptor": config.descriptor})
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": f"{API}.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            **descriptor,
            "services": [GATEWAY_SERVICE, LIVE_SERVICE],
            "print_options": {
                "always_print_primitive_fields": True,
                "preserve_proto_field_names": True,
                "stream_sse_style_delimited": True,  # server-streaming routes answer text/event-stream
            },
            "convert_grpc_status": True,  # errors as JSON {code, message} with the mapped HTTP status
            "max_request_body_size": config.max_body_bytes,  # beyond it: 413 (a raw media body, held whole)
            "max_response_body_size": config.max_body_bytes,
            "request_validation_options": {"reject_unknown_query_parameters": True, "reject_unknown_method": True},
        },
    }


def _gateway_cluster(config: EdgeConfig) -> dict:
    return {
        "name": "gateway",
        "type": "STRICT_DNS",  # an IP here, a Service name in Kubernetes
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": config.max_gateway_connections,
            "max_pending_requests": config.max_gateway_pending_requests,
            "max_requests": config.max_gateway_requests,
            "max_retries": config.max_gateway_retries,
            "track_remaining": True,  # cluster.gateway.circuit_breakers.default.remaining_* in /stats
        }]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{API}.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},  # gRPC needs HTTP/2 to the gateway
            },
        },
        "load_assignment": {"cluster_name": "gateway", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(config.gateway_host, config.gateway_port)}},
        ]}]},
        "health_checks": [{
            "timeout": "2s", "interval": "2s", "no_traffic_interval": "2s",
            "unhealthy_threshold": 1, "healthy_threshold": 1,
            "grpc_health_check": {},
        }],
    }


def _authz_cluster(config: EdgeConfig) -> dict:
    """The gateway's key-check endpoint (HTTP/1.1, a connection per check). Few connections at once (each is a
    thread there), and a deep queue in front of them: checks take about a millisecond, so a burst of key-less
    requests waits its turn rather than having keyed callers' checks refused (503) with it."""
    return {
        "name": "authz",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": 32,
                                             "max_pending_requests": 4096, "max_requests": 4096}]},
        "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(config.gateway_host, config.authz_port)}},
        ]}]},
    }


def _tls(cert: str, key: str) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{API}.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}],
                "alpn_protocols": ["h2", "http/1.1"],
            },
        },
    }


def main(argv: list[str] | None = None) -> None:
    defaults = EdgeConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-host", default=defaults.listen_host)
    parser.add_argument("--listen-port", type=int, default=defaults.listen_port)
    parser.add_argument("--admin-port", type=int, default=defaults.admin_port)
    parser.add_argument("--gateway", default=f"{defaults.gateway_host}:{defaults.gateway_port}", help="host:port")
    parser.add_argument("--descriptor", default=defaults.descriptor)
    parser.add_argument("--authz-port", type=int, default=defaults.authz_port,
                        help="the gateway's key-check port (SWL_GATEWAY_AUTHZ_PORT), on the --gateway host")
    parser.add_argument("--max-upload-mb", type=int, default=defaults.max_upload_mb,
                        help="the gateway's SWL_GATEWAY_MAX_UPLOAD_MB: the raw media routes' body limit")
    parser.add_argument("--max-json-body-mb", type=int, default=defaults.max_json_body_mb,
                        help="the largest JSON body (base64 media) Envoy buffers for transcoding; beyond it 413")
    parser.add_argument("--max-downstream-connections", type=int, default=defaults.max_downstream_connections,
                        help="client connections Envoy holds at once; beyond it new ones are closed")
    parser.add_argument("--route-timeout-s", type=int, default=defaults.route_timeout_s)
    parser.add_argument("--stream-idle-timeout-s", type=int, default=defaults.stream_idle_timeout_s)
    parser.add_argument("--xff-num-trusted-hops", type=int, default=defaults.xff_num_trusted_hops,
                        help="proxies in front of Envoy whose X-Forwarded-For entry is trusted (0: Envoy is the edge)")
    parser.add_argument("--per-client-requests-per-s", type=int, default=defaults.per_client_requests_per_s,
                        help="requests a second each client address may make, key or none (429 beyond)")
    parser.add_argument("--per-client-burst", type=int, default=defaults.per_client_burst,
                        help="requests a client address may make at once before its rate applies")
    parser.add_argument("--memory-limit-mib", type=int, default=defaults.memory_limit_mib,
                        help="Envoy's container memory limit: the overload manager's heap size")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--embed-descriptor", action="store_true", help="put the descriptor inside the config")
    parser.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    host, _, port = args.gateway.rpartition(":")
    config = EdgeConfig(listen_host=args.listen_host, listen_port=args.listen_port, admin_port=args.admin_port,
                        gateway_host=host, gateway_port=int(port), authz_port=args.authz_port,
                        descriptor=args.descriptor, max_upload_mb=args.max_upload_mb,
                        max_json_body_mb=args.max_json_body_mb,
                        max_downstream_connections=args.max_downstream_connections,
                        route_timeout_s=args.route_timeout_s,
                        stream_idle_timeout_s=args.stream_idle_timeout_s,
                        xff_num_trusted_hops=args.xff_num_trusted_hops,
                        per_client_requests_per_s=args.per_client_requests_per_s,
                        per_client_burst=args.per_client_burst, memory_limit_mib=args.memory_limit_mib,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, embed_descriptor=args.embed_descriptor)
    text = json.dumps(render(config), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
