"""`python -m webui`: serves the web UI until interrupted."""

from service_runtime.logs import configure_logging

from .app import build
from .settings import WebUISettings


def main() -> None:
    settings = WebUISettings.from_env()
    configure_logging("INFO")
    # run_history=False: Gradio would otherwise keep every call's inputs and outputs in the browser's
    # localStorage (whatever a visitor typed among them), for whoever uses that browser next, and offer to upload
    # them to a Hugging Face bucket.
    build(settings).queue(default_concurrency_limit=4).launch(
        server_name=settings.host, server_port=settings.port, show_error=False, quiet=True,
        max_file_size=f"{settings.max_upload_mb}mb", footer_links=[], run_history=False)


if __name__ == "__main__":
    main()
