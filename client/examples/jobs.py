"""Queue a job, wait for it, download the video: python jobs.py FACE SPEECH OUT.mp4"""
import os
import sys

from superwav2lip_client import Client

face, speech, output = sys.argv[1:4]
with Client(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051")) as client:
    job = client.submit_job(face, speech)
    print(f"submitted {job.job_id}")
    finished = client.wait_job(job.job_id)
    print(f"{job.job_id}: state {finished.state}, {finished.result.frames} frames")
    client.job_video(job.job_id, output=output)
