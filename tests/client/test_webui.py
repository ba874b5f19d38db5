"""The web UI in a real headless Chromium (Debian's `chromium`, driven by playwright with executable_path; playwright's
own browser download cannot work here), against the UI process and an in-process stack."""

import asyncio
import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import av

from tests.support.paths import ROOT, SHARED_MEDIA, SHARED_MODELS, system_binary
from tests.support.processes import free_port, project_env
from tests.support.media_factory import encode_png, scene, speech_wav, stream_durations, with_marker
from tests.support.stack import running_stack

ARTIFACTS = Path(os.environ.get("SWL_TEST_ARTIFACTS", ROOT / ".run" / "test-artifacts"))


def media_and_models(dev_models_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A real photo and real speech with the real detector when ../shared has them, else made-up media that the
    generated detector finds a face in."""
    real = [SHARED_MEDIA / "face_astronaut.png", SHARED_MEDIA / "speech_en_4s.wav",
            SHARED_MODELS / "scrfd_2.5g_bnkps.onnx"]
    if all(path.is_file() for path in real):
        models = tmp_path / "models"
        models.mkdir()
        shutil.copy(dev_models_dir / "manifest.json", models / "manifest.json")
        os.symlink(dev_models_dir / "dev", models / "dev")
        os.symlink(real[2], models / real[2].name)
        return real[0], real[1], models
    (tmp_path / "face.png").write_bytes(encode_png(with_marker(scene(320, 240), 160, 110)))
    (tmp_path / "speech.wav").write_bytes(speech_wav(2.0))
    return tmp_path / "face.png", tmp_path / "speech.wav", dev_models_dir


API_KEY = "ui-side-secret-4242"


@contextlib.contextmanager
def web_ui(gateway_address: str, log_path: Path):
    port = free_port()
    env = project_env(SWL_WEBUI_HOST="127.0.0.1", SWL_WEBUI_PORT=str(port), SWL_WEBUI_GATEWAY_ADDRESS=gateway_address,
                      GRADIO_ANALYTICS_ENABLED="False", SWL_WEBUI_API_KEY=API_KEY)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "webui"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


async def choose_file(page, component: str, path: Path) -> None:
    """Uploads as a person does: click the component's drop zone, pick the file in the chooser."""
    async with page.expect_file_chooser() as chooser:
        await page.locator(component).get_by_text("Click to Upload").click()
    await (await chooser.value).set_files(str(path))


async def test_the_page_generates_shows_progress_plays_downloads_and_reports_errors(dev_models_dir, tmp_path):
    from playwright.async_api import async_playwright, expect

    face, speech, models = media_and_models(dev_models_dir, tmp_path)
    seconds = float(av.open(str(speech)).streams.audio[0].duration * av.open(str(speech)).streams.audio[0].time_base)
    (tmp_path / "notes.txt").write_text("this is not a face")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with running_stack(models, api_keys=(API_KEY,)) as stack:  # only the UI's server knows the key
        with web_ui(stack.address("gateway"), tmp_path / "webui.log") as url:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=system_binary("chromium"),
                                                           args=["--no-sandbox"])
                page = await browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
                await page.goto(url)
                await expect(page.get_by_text("Super Wav2Lip").first).to_be_visible(timeout=30_000)
                config = await (await page.request.get(url + "config")).text()
                assert API_KEY not in await page.content() and API_KEY not in config

                await choose_file(page, "#face", face)
                await choose_file(page, "#speech", speech)
                await expect(page.locator("#speech audio, #speech wave, #speech .waveform-container").first
                             ).to_be_attached(timeout=30_000)
                await page.locator("#generate").click()
                status = page.locator("#status")
                seen = set()
                deadline = time.monotonic() + 180
                while "Done" not in (text := await status.inner_text()):
                    seen.add(text.split(":")[0])
                    assert time.monotonic() < deadline, f"no result; status {text!r}"
                    await asyncio.sleep(0.1)
                assert seen & {"decode", "detect", "lipsync", "encode"}, seen  # live progress reached the page
                # generated weights here: the warning stays under the status, with the command that fixes it
                assert "generated demo weights" in text and "make models" in text, text

                video = page.locator("#result video")
                await expect(video).to_be_attached(timeout=30_000)
                assert await video.get_attribute("src")
                await page.wait_for_function("document.querySelector('#result video').readyState >= 1",
                                             timeout=30_000)
                duration = await video.evaluate("v => v.duration")
                assert abs(duration - seconds) <= 0.1, (duration, seconds)  # the browser can play it

                async with page.expect_download() as download_info:
                    await page.locator("#download a").first.click()
                downloaded = Path(await (await download_info.value).path())
                data = downloaded.read_bytes()
                assert data[4:8] == b"ftyp" and abs(stream_durations(data)["video"] - seconds) <= 0.04
                await page.screenshot(path=str(ARTIFACTS / "webui-result.png"), full_page=True)

                await page.locator("#face button[aria-label='Clear'], #face button[title='Clear']").first.click()
                await choose_file(page, "#face", tmp_path / "notes.txt")
                await page.locator("#generate").click()
                await expect(status).to_contain_text("Failed", timeout=60_000)
                message = await status.inner_text()
                await page.screenshot(path=str(ARTIFACTS / "webui-error.png"), full_page=True)
                assert not await video.count() or not await video.get_attribute("src")  # the old result is gone

                # Avatars: make one from the face, see it listed and offered on the Generate tab.
                await page.get_by_role("tab", name="Avatars").click()
                await choose_file(page, "#avatar-face", face)
                await page.locator("#avatar-name textarea, #avatar-name input").first.fill("astronaut")
                await page.get_by_role("button", name="Make avatar").click()
                await expect(page.locator("#avatar-status")).to_contain_text("Made avatar av_", timeout=60_000)
                await expect(page.locator("#avatars")).to_contain_text("astronaut", timeout=30_000)
                from superwav2lip_client import Client
                job = await asyncio.to_thread(lambda: Client(stack.address("gateway"), api_key=API_KEY).submit_job(
                    face, speech))
                await page.get_by_role("tab", name="Recent jobs").click()
                await page.locator("#refresh-jobs").click()
                await expect(page.locator("#jobs")).to_contain_text(job.job_id[:16], timeout=30_000)
                await browser.close()
    assert "INVALID_ARGUMENT" in message and "face" in message and "request id" in message, message
    assert "Traceback" not in message and "File \"" not in message
    assert "Traceback" not in (tmp_path / "webui.log").read_text()


@contextlib.contextmanager
def served(folder: Path):
    """A plain HTTP server for the files in `folder` on a loopback port; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


FIRST_FRAME_MEDIA_TIME = """async (src) => {
    const video = document.createElement("video");
    video.muted = true;
    video.src = src;
    document.body.appendChild(video);
    const first = new Promise(resolve => video.requestVideoFrameCallback((now, frame) => resolve(frame.mediaTime)));
    await video.play();
    return await first;
}"""


async def test_the_browser_presents_the_first_frame_at_zero_in_both_formats(dev_models_dir, tmp_path):
    """Chromium plays the streamed (fragmented) and the faststart output; requestVideoFrameCallback reports the first
    frame's presentation time, which must be 0 (the streamed file used to start two frames late)."""
    from playwright.async_api import async_playwright

    from tests.support.flash_and_click import encode_speech, flash_clip

    face, speech = flash_clip(), encode_speech("wav")
    async with running_stack(dev_models_dir, data_dir=str(tmp_path / "data")) as stack:
        (tmp_path / "streamed.mp4").write_bytes((await stack.generate(face, speech))[0])
        (tmp_path / "faststart.mp4").write_bytes((await stack.generate_video(face, speech)).data)
    with served(tmp_path) as base:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=system_binary("chromium"),
                                                       args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
            page = await browser.new_page()
            await page.goto(base)
            media_times = {name: await page.evaluate(FIRST_FRAME_MEDIA_TIME, base + name)
                           for name in ("streamed.mp4", "faststart.mp4")}
            await browser.close()
    assert all(abs(t) <= 0.001 for t in media_times.values()), media_times
