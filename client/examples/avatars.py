"""Plan a face once as an avatar, then speak with it: python avatars.py FACE SPEECH OUT.mp4"""
import os
import sys

from superwav2lip_client import Client

face, speech, output = sys.argv[1:4]
with Client(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051")) as client:
    avatar = client.create_avatar(face, name="presenter", target_rule="largest")
    print(f"avatar {avatar.avatar_id}: {avatar.frames} frames")
    client.generate(audio=speech, avatar=avatar.avatar_id, output=output)  # no face upload, no re-planning
    print(f"{len(client.list_avatars())} avatar(s) stored")
    client.delete_avatar(avatar.avatar_id)
