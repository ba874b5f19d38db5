"""GFPGAN face restoration service."""
