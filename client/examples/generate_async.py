"""The same with asyncio, two generations at once: python generate_async.py FACE SPEECH OUT_PREFIX"""
import asyncio
import os
import sys

from superwav2lip_client import AsyncClient


async def main(face: str, speech: str, prefix: str) -> None:
    async with AsyncClient(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051")) as client:
        results = await asyncio.gather(client.generate(face, speech, output=f"{prefix}-1.mp4"),
                                       client.generate(face, speech, output=f"{prefix}-2.mp4", crop_mode="box"))
    for n, result in enumerate(results, 1):
        print(f"{prefix}-{n}.mp4: {result.info.frames} frames")


asyncio.run(main(*sys.argv[1:4]))
