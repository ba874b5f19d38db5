"""`python -m webui`: serves the web UI until interrupted."""

import logging
import sys

from service_runtime.logs import configure_logging
from service_runtime.settings import SettingsError

from .settings import WebUISettings

log = logging.getLogger("webui")


def main() -> None:
    configure_logging("INFO")  # so that a configuration mistake is a JSON line too
    try:
        settings = WebUISettings.from_env()
    except SettingsError as error:  # a configuration mistake: one line, no traceback
        log.error("cannot start: %s", error, extra={"service": "webui"})
        sys.exit(2)
    from .app import build  # after the settings check: a mistake is reported without waiting for gradio's import
    from .live import SCRIPT

    # run_history=False: Gradio would otherwise keep every call's inputs and outputs in the browser's
    # localStorage (whatever a visitor typed among them), for whoever uses that browser next, and offer to upload
    # them to a Hugging Face bucket.
    build(settings).queue(default_concurrency_limit=4).launch(
        server_name=settings.host, server_port=settings.port, show_error=False, quiet=True,
        max_file_size=f"{settings.max_upload_mb}mb", footer_links=[], run_history=False, head=SCRIPT)


if __name__ == "__main__":
    main()
