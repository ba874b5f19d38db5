"""Python SDK and command-line client of the Super Wav2Lip gateway."""
