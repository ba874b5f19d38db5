"""Deployment material: the Envoy edge config renderer (Kubernetes manifests will join it)."""
