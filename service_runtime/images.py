"""Conversions between wire Images (uint8 BGR or encoded) and numpy arrays."""

from __future__ import annotations

import cv2
import numpy as np
from superwav2lip.common.v1 import media_pb2

from .errors import InvalidArgument


def decode_image(image: media_pb2.Image, what: str = "image") -> np.ndarray:
    """Returns an HxWx3 uint8 BGR array, or raises InvalidArgument saying what is wrong."""
    if image.format == media_pb2.PIXEL_FORMAT_ENCODED:
        decoded = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR) if image.data else None
        if decoded is None:
            raise InvalidArgument(f"{what}: {len(image.data)} bytes are not a picture OpenCV can decode")
        return decoded
    if image.format != media_pb2.PIXEL_FORMAT_BGR24:
        raise InvalidArgument(f"{what}: pixel format {image.format} is not supported (use BGR24 or ENCODED)")
    if image.width <= 0 or image.height <= 0:
        raise InvalidArgument(f"{what}: width and height must be positive, got {image.width}x{image.height}")
    expected = image.width * image.height * 3
    if len(image.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(image.data)} bytes do not match {image.width}x{image.height} BGR24 ({expected} bytes)"
        )
    return np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3)


def encode_image(pixels: np.ndarray) -> media_pb2.Image:
    """Wraps an HxWx3 uint8 BGR array as a BGR24 Image."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    return media_pb2.Image(data=pixels.tobytes(), width=width, height=height,
                           format=media_pb2.PIXEL_FORMAT_BGR24)


def to_model_input(bgr: np.ndarray, channel_order: str, mean, std) -> np.ndarray:
    """HxWx3 uint8 BGR -> 3xHxW float32 in the model's channel order and scale."""
    pixels = bgr[..., ::-1] if channel_order.upper() == "RGB" else bgr
    scaled = (pixels.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def from_model_output(tensors: np.ndarray, channel_order: str, mean, std) -> np.ndarray:
    """Bx3xHxW float32 model output -> BxHxWx3 uint8 BGR (inverse of `to_model_input`, rounded)."""
    pixels = tensors.transpose(0, 2, 3, 1) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels[..., ::-1] if channel_order.upper() == "RGB" else pixels)
