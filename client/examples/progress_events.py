"""Follow a generation's progress event by event: python progress_events.py FACE SPEECH OUT.mp4"""
import os
import sys

from superwav2lip_client import Client, Progress

face, speech, output = sys.argv[1:4]
with Client(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051")) as client:
    with open(face, "rb") as face_file:  # paths, bytes or open files all work
        for event in client.generate_events(face_file, speech):
            if isinstance(event, Progress):
                print(f"{event.stage:<8} {event.done}/{event.total}")
            else:
                event.save(output)
                print(f"done: {output}")
