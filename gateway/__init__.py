"""Public gateway: media decoding, mel, orchestration of the model services, paste-back and encoding."""
