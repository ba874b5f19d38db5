"""A voice agent's TTS stream into a live session, printing what comes back: python live_tts.py AVATAR_ID SPEECH

The speech file stands in for a TTS engine: cut into sentences, each streamed in irregular chunks of 20-200 ms
at real-time pace with a short gap between sentences, and an end of utterance after each."""
import asyncio
import os
import random
import sys
import time

from superwav2lip_client import AsyncClient, LiveEvent, LiveEventKind, LiveFrame
from superwav2lip_client.live_media import speech_pcm16

RATE = 16000


def sentences(pcm: bytes, seconds: float = 1.2) -> list[bytes]:
    step = 2 * int(RATE * seconds)
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def tts(live, parts: list[bytes]) -> None:
    """Each sentence in chunks of 20-200 ms, each chunk when its last sample would have been spoken."""
    for sentence in parts:
        clock = time.monotonic()
        for start, size in chunks(len(sentence)):
            clock += size / 2 / RATE
            await asyncio.sleep(max(0.0, clock - time.monotonic()))
            await live.send(sentence[start : start + size])
        await live.end_utterance()
        await asyncio.sleep(random.uniform(0.05, 0.25))  # the TTS starts on the next sentence
    await live.close()  # the session ends once everything sent has played


def chunks(length: int):
    start = 0
    while start < length:
        size = 2 * int(RATE * random.uniform(0.02, 0.2))
        yield start, min(size, length - start)
        start += size


async def main(avatar_id: str, speech: str) -> None:
    parts = sentences(speech_pcm16(speech, RATE))
    async with AsyncClient(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051")) as client:
        async with client.live(avatar_id, sample_rate=RATE, return_audio=True) as live:
            print(f"ready: {live.ready.fps:g} fps, {live.ready.width}x{live.ready.height}, "
                  f"lookahead {live.ready.lookahead_s * 1000:.0f} ms {live.ready.reduced_because}")
            sender = asyncio.create_task(tts(live, parts))
            frames = speaking = 0
            async for item in live:
                if isinstance(item, LiveFrame):
                    frames += 1
                    speaking += item.speaking  # item.data: a JPEG to show; item.pcm: the audio to play with it
                elif isinstance(item, LiveEvent):
                    detail = f" ({item.count}, {item.reason})" if item.kind == LiveEventKind.FRAMES_DROPPED else ""
                    print(f"frame {item.frame_index:>4}: {item.kind.value}{detail}")
            await sender
    print(f"{len(parts)} sentences, {frames} frames, {speaking} speaking")


asyncio.run(main(*sys.argv[1:3]))
