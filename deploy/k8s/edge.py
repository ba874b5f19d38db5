"""The Kubernetes edge's Envoy config, rendered from the same source as local runs (`deploy/envoy/render.py`).

    python -m deploy.k8s.edge          # rewrite deploy/k8s/base/envoy/envoy.json
    python -m deploy.k8s.edge --check  # exit 1 when the checked-in file differs from the rendering
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deploy.envoy.render import EdgeConfig, render

CONFIG_PATH = Path(__file__).resolve().parent / "base" / "envoy" / "envoy.json"
# The gateway's headless Service and its SWL_GATEWAY_MAX_UPLOAD_MB in base/gateway/deployment.yaml.
K8S_EDGE = EdgeConfig(listen_host="0.0.0.0", listen_port=8080, admin_port=9901, gateway_host="gateway",
                      gateway_port=50051, max_upload_mb=512, embed_descriptor=True)


def rendered() -> str:
    return json.dumps(render(K8S_EDGE), indent=2) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        CONFIG_PATH.write_text(rendered())
        print(f"wrote {CONFIG_PATH}")
    elif CONFIG_PATH.read_text() != rendered():
        sys.exit(f"{CONFIG_PATH} is out of date: run `python -m deploy.k8s.edge`")


if __name__ == "__main__":
    main()
