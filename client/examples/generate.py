"""Generate a lip-synced mp4 (sync client): python generate.py FACE SPEECH OUT.mp4"""
import os
import sys

from superwav2lip_client import Client

face, speech, output = sys.argv[1:4]
with Client(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051")) as client:
    result = client.generate(face, speech, output=output, crop_mode="aligned")
print(f"{output}: {result.info.frames} frames at {result.info.fps:g} fps, {result.info.size_bytes} bytes")
