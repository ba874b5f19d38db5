"""The one Envoy config, rendered for local runs, tests and Kubernetes."""
