"""Wav2Lip lip-sync generation service."""
