"""Shared runtime for every Super Wav2Lip service: settings, ONNX sessions, batching, health, metrics, logs."""
