"""The web UI as a process for tests, and signing in to it from a playwright page."""

import contextlib
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.paths import ROOT
from tests.support.processes import free_port, project_env
from tests.support.waiting import eventually
from webui.settings import REMOVED_API_KEY


@contextlib.contextmanager
def web_ui(gateway_address: str, log_path: Path):
    port = free_port()
    env = project_env(SWL_WEBUI_HOST="127.0.0.1", SWL_WEBUI_PORT=str(port), SWL_WEBUI_GATEWAY_ADDRESS=gateway_address,
                      GRADIO_ANALYTICS_ENABLED="False")
    env.pop(REMOVED_API_KEY, None)
    env.pop("SUPERWAV2LIP_API_KEY", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "webui"], cwd=ROOT, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}/"

        def answers() -> bool:
            assert process.poll() is None, f"the web UI exited:\n{log_path.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=2)
            except OSError:
                return False
            return True

        try:
            try:
                eventually(answers, seconds=90, every=0.1, what=f"the web UI answering on {url}")
            except AssertionError as error:
                raise AssertionError(f"{error}\n{log_path.read_text()}") from None
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


async def sign_in(page, key: str, outcome: str) -> str:
    """Types `key` into the sign-in form and sends it; waits for the page to say `outcome` about the account and
    returns all it says."""
    from playwright.async_api import expect

    account = page.locator("#account")
    await page.locator("#api-key input, #api-key textarea").first.fill(key)
    await page.locator("#sign-in").click()
    await expect(account).to_contain_text(outcome, timeout=30_000)
    return await account.inner_text()
