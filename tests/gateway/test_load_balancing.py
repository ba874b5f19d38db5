"""The gateway balances over every replica of a model service, as it does behind a headless Service."""

import contextlib

from services.lipsync.service import LipSyncService, LipSyncSettings

from tests.support.inprocess import local_settings, started
from tests.support.media_factory import encode_png, scene, speech_wav, with_marker
from tests.support.stack import running_stack


def lipsync_calls(server) -> float:
    return sum(sample.value for family in server.service.metrics.registry.collect()
               if family.name == "swl_grpc_requests" for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("code") == "OK")


async def test_round_robin_over_two_replicas_and_the_survivor_takes_over(dev_models_dir):
    still = encode_png(with_marker(scene(160, 120), 60, 45))
    async with contextlib.AsyncExitStack() as replicas:
        first, _ = await replicas.enter_async_context(started(LipSyncService(local_settings(LipSyncSettings,
                                                                                            dev_models_dir))))
        second, _ = await replicas.enter_async_context(started(LipSyncService(local_settings(LipSyncSettings,
                                                                                             dev_models_dir))))
        # The address form a resolver gives for a headless Service: one name, several pod addresses.
        both = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        async with running_stack(dev_models_dir, external={"lipsync": both}, rpc_batch_items=4) as stack:
            _, info, _ = await stack.generate(still, speech_wav(2.0))
            assert info.frames == 50
            calls = [lipsync_calls(first), lipsync_calls(second)]
            assert min(calls) >= 4 and sum(calls) >= 13, calls  # 50 frames in parts of 4, split between both

            await first.stop(0)
            _, info, _ = await stack.generate(still, speech_wav(1.0))
            assert info.frames == 25
            assert lipsync_calls(first) == calls[0]  # the stopped replica got nothing more
            assert lipsync_calls(second) >= calls[1] + 7
