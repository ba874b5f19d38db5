"""The Kubernetes edge's Envoy config, rendered from the same source as local runs (`deploy/envoy/render.py`).

    python -m deploy.k8s.edge          # rewrite base/envoy/envoy.json and components/edge-tls/envoy.json
    python -m deploy.k8s.edge --check  # exit 1 when a checked-in file differs from the rendering
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from deploy.envoy.render import EdgeConfig, render

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "base" / "envoy" / "envoy.json"
TLS_CONFIG_PATH = HERE / "components" / "edge-tls" / "envoy.json"
TLS_FOLDER = "/etc/envoy-tls"  # where components/edge-tls mounts the kubernetes.io/tls Secret envoy-tls
# The gateway's headless Service, its SWL_GATEWAY_AUTHZ_PORT and SWL_GATEWAY_MAX_UPLOAD_MB in
# base/gateway/deployment.yaml. The edge-tls component adds the listener's TLS from a mounted Secret.
K8S_EDGE = EdgeConfig(listen_host="0.0.0.0", listen_port=8080, admin_port=9901, gateway_host="gateway",
                      gateway_port=50051, authz_port=9105, max_upload_mb=512, embed_descriptor=True)


K8S_EDGE_TLS = dataclasses.replace(K8S_EDGE, tls_cert=f"{TLS_FOLDER}/tls.crt", tls_key=f"{TLS_FOLDER}/tls.key")


def rendered(config: EdgeConfig = K8S_EDGE) -> str:
    return json.dumps(render(config), indent=2) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    for path, config in ((CONFIG_PATH, K8S_EDGE), (TLS_CONFIG_PATH, K8S_EDGE_TLS)):
        if not args.check:
            path.write_text(rendered(config))
            print(f"wrote {path}")
        elif path.read_text() != rendered(config):
            sys.exit(f"{path} is out of date: run `python -m deploy.k8s.edge`")


if __name__ == "__main__":
    main()
