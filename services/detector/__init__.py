"""Face detection and recognition service."""
