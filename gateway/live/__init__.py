"""Live mode: speech streamed in, an avatar's lip-synced frames paced out in real time (docs/live.md)."""
