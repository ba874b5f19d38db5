"""The Super Wav2Lip client SDK: sync `Client` and asyncio `AsyncClient` over the gateway's gRPC API."""

from .aio import AsyncClient, AsyncLiveSession
from .core import NO_RETRY, RetryPolicy
from .sync import Client, LiveSession
from .types import (CropMode, EnhanceRegion, Event, FrameFormat, LiveEvent, LiveEventKind, LiveFrame, LiveItem,
                    LiveReady, LoopMode, NoFacePolicy, Options, Progress, Result, SuperWav2LipError, TargetRule,
                    VideoInfo)

__all__ = ["AsyncClient", "AsyncLiveSession", "Client", "CropMode", "EnhanceRegion", "Event", "FrameFormat",
           "LiveEvent", "LiveEventKind", "LiveFrame", "LiveItem", "LiveReady", "LiveSession", "LoopMode", "NO_RETRY",
           "NoFacePolicy", "Options", "Progress", "Result", "RetryPolicy", "SuperWav2LipError", "TargetRule",
           "VideoInfo"]
