"""numpy's OpenBLAS pool in a service process: limited to one thread, so it does not spin between small calls."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import ROOT

# Wav2Lip's mel window for one live frame, twelve times a second for two seconds: what a live session's gateway does.
MEL_LOOP = """
import sys, time
import numpy as np
from gateway.audio import melspectrogram
speech = np.random.default_rng(0).standard_normal(6000).astype(np.float32) * 0.1
melspectrogram(speech)  # every library loaded first, as a service has them when run_service starts
if sys.argv[1] == "limited":
    from service_runtime.server import limit_blas_threads
    limit_blas_threads()
started, cpu = time.monotonic(), time.process_time()
while time.monotonic() - started < 2.0:
    melspectrogram(speech)
    time.sleep(1 / 12)
import threadpoolctl
pools = [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]
print((time.process_time() - cpu) / (time.monotonic() - started), max(pools))
"""


def cores_used(mode: str) -> tuple[float, int]:
    """The cores the loop used, and the most threads any BLAS pool of the process has."""
    done = subprocess.run([sys.executable, "-c", MEL_LOOP, mode], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    cores, threads = done.stdout.split()
    return float(cores), int(threads)


def test_small_matrix_products_twelve_times_a_second_cost_little_cpu_once_blas_is_one_thread():
    """Unlimited, OpenBLAS's workers busy-wait for the next call between these products: 1.0 core measured on two
    cores for 12 mel windows a second (printed, not asserted: a one-core machine has no worker to spin). Limited,
    the process uses what the products cost."""
    (unlimited, default_threads), (limited, threads) = cores_used("default"), cores_used("limited")
    print(f"cores used: {unlimited:.3f} with numpy's default BLAS threads ({default_threads}), {limited:.3f} with one")
    assert threads == 1 and limited < 0.25, (threads, limited)
