"""Errors carry the status code, the message and the request id; busy or restarting servers are retried:
python errors_and_retries.py NOT_A_FACE SPEECH"""
import os
import sys

from superwav2lip_client import Client, RetryPolicy, SuperWav2LipError

not_a_face, speech = sys.argv[1:3]
policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.2, max_backoff_s=5)  # UNAVAILABLE, RESOURCE_EXHAUSTED only
with Client(os.environ.get("SUPERWAV2LIP_ADDRESS", "localhost:50051"), retry=policy, timeout=120) as client:
    try:
        client.generate(not_a_face, speech)
    except SuperWav2LipError as error:
        print(f"refused: {error.code.name}: {error.message} (request id {error.request_id})")
