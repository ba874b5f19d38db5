"""The Super Wav2Lip client SDK: sync `Client` and asyncio `AsyncClient` over the gateway's gRPC API."""

from .aio import AsyncClient
from .core import NO_RETRY, RetryPolicy
from .sync import Client
from .types import (CropMode, EnhanceRegion, Event, LoopMode, NoFacePolicy, Options, Progress, Result,
                    SuperWav2LipError, TargetRule, VideoInfo)

__all__ = ["AsyncClient", "Client", "CropMode", "EnhanceRegion", "Event", "LoopMode", "NO_RETRY", "NoFacePolicy",
           "Options", "Progress", "Result", "RetryPolicy", "SuperWav2LipError", "TargetRule", "VideoInfo"]
