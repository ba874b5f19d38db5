"""The Gradio page: generate (upload, record or pick an avatar; options; live progress; play and download), manage
avatars, see recent jobs. Every call goes through the SDK; errors are shown as messages, never tracebacks."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from superwav2lip.gateway.v1 import gateway_pb2
from superwav2lip_client import Client, Progress, Result, SuperWav2LipError

from .settings import WebUISettings

log = logging.getLogger(__name__)
NO_AVATAR = "(none: use the uploaded face)"
JOB_COLUMNS = ["job", "state", "created", "progress or error"]
AVATAR_COLUMNS = ["avatar", "name", "size", "frames", "created"]


def banner(warnings: list[str]) -> str:
    """The server's warnings as a quoted block under the status line (markdown), e.g. that the models run on
    generated demo weights, so the mouth will be noise until the real ones are installed."""
    return "".join(f"\n\n> **{w}**" for w in warnings)


def shown(message: str) -> gr.Error:
    """An error the page shows as a message; the UI logs it as one JSON line instead of a traceback."""
    return gr.Error(message, print_exception=False)


def readable(error: SuperWav2LipError) -> str:
    """What the page shows for a failed call: the reason, then the code and request id for a support ticket."""
    return f"{error.message} ({error.code.name}; request id {error.request_id})"


class Backend:
    """The UI's calls to the gateway; the API key stays here, on the server side."""

    def __init__(self, settings: WebUISettings) -> None:
        self.settings = settings
        self.outputs = Path(tempfile.mkdtemp(prefix="superwav2lip-webui-"))

    def client(self) -> Client:
        return Client(self.settings.gateway_address, api_key=self.settings.api_key or None,
                      timeout=self.settings.timeout_s)

    def generate(self, face: str | None, speech: str | None, avatar: str, crop_mode: str, enhance: bool,
                 reference: str | None, pad_top: float, pad_bottom: float, pad_left: float,
                 pad_right: float) -> Iterator[tuple[str, str | None, str | None]]:
        """Yields (status, video, download) as the job runs: each progress event updates the status line, and a
        refusal or failure ends there as a readable message."""
        use_avatar = avatar and avatar != NO_AVATAR
        if not speech:
            raise shown("Add speech: upload a file or record with the microphone.")
        if not face and not use_avatar:
            raise shown("Add a face photo or video, or pick an avatar.")
        options: dict = {"crop_mode": crop_mode, "enhance": enhance,
                         "padding": tuple(int(v or 0) for v in (pad_top, pad_bottom, pad_left, pad_right))}
        if reference:
            options["reference_face"] = reference
        yield "Uploading...", None, None
        warnings: list[str] = []  # the server's, kept under every later status line: a banner until the next job
        try:
            with self.client() as client:
                for event in client.generate_events(None if use_avatar else face, speech,
                                                    avatar=avatar.split(" ", 1)[0] if use_avatar else None,
                                                    **options):
                    if isinstance(event, Progress):
                        if event.message and event.message not in warnings:
                            warnings.append(event.message)
                        yield self._status(event) + banner(warnings), None, None
                    elif isinstance(event, Result):
                        path = event.save(self.outputs / f"superwav2lip-{event.request_id[:12]}.mp4")
                        info = event.info
                        yield (f"Done: {info.width}x{info.height}, {info.fps:g} fps, {info.frames} frames, "
                               f"{info.audio_seconds:.2f} s" + banner(warnings), str(path), str(path))
        except SuperWav2LipError as error:  # stays on the page, where the progress was
            log.warning("generation failed", extra={"code": error.code.name, "request_id": error.request_id})
            yield f"**Failed:** {readable(error)}", None, None
        except (ValueError, OSError) as error:
            raise shown(str(error)) from None

    @staticmethod
    def _status(progress: Progress) -> str:
        return f"{progress.stage}: {progress.done}/{progress.total} ({progress.fraction:.0%})"

    def avatars(self) -> tuple[list[list], list[str]]:
        """(table rows, dropdown choices); on failure the table says why instead of raising."""
        try:
            with self.client() as client:
                avatars = client.list_avatars()
        except SuperWav2LipError as error:
            return [[f"cannot list avatars: {readable(error)}", "", "", "", ""]], [NO_AVATAR]
        rows = [[a.avatar_id, a.name, f"{a.width}x{a.height}", a.frames, _when(a.created_unix)] for a in avatars]
        return rows, [NO_AVATAR] + [f"{a.avatar_id} {a.name}".strip() for a in avatars]

    def create_avatar(self, face: str | None, name: str) -> str:
        if not face:
            raise shown("Add a face photo or video to make an avatar from.")
        try:
            with self.client() as client:
                avatar = client.create_avatar(face, name=name or Path(face).name)
        except SuperWav2LipError as error:
            raise shown(readable(error)) from None
        return f"Made avatar {avatar.avatar_id} ({avatar.frames} frames)."

    def delete_avatar(self, avatar_id: str) -> str:
        if not avatar_id.strip():
            raise shown("Type the id of the avatar to delete.")
        try:
            with self.client() as client:
                client.delete_avatar(avatar_id.strip())
        except SuperWav2LipError as error:
            raise shown(readable(error)) from None
        return f"Deleted {avatar_id.strip()}."

    def jobs(self) -> list[list]:
        try:
            with self.client() as client:
                jobs = client.list_jobs()
        except SuperWav2LipError as error:
            return [[f"cannot list jobs: {readable(error)}", "", "", ""]]
        return [[j.job_id, gateway_pb2.Job.State.Name(j.state), _when(j.created_unix), _job_detail(j)] for j in jobs]


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix)) if unix else ""


def _job_detail(job: gateway_pb2.Job) -> str:
    if job.error_message:
        return f"{job.error_status}: {job.error_message}"
    return f"{job.progress.stage} {job.progress.done}/{job.progress.total}" if job.progress.total else ""


def build(settings: WebUISettings) -> gr.Blocks:
    backend = Backend(settings)
    with gr.Blocks(title="Super Wav2Lip") as page:
        gr.Markdown("# Super Wav2Lip\nA face photo or video and a speech track in; the face speaking it out.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    face = gr.File(label="Face photo or video", type="filepath", elem_id="face")
                    avatar = gr.Dropdown(label="...or an avatar", choices=[NO_AVATAR], value=NO_AVATAR,
                                         elem_id="avatar")
                    speech = gr.Audio(label="Speech (upload or record)", sources=["upload", "microphone"],
                                      type="filepath", elem_id="speech")
                    with gr.Accordion("Options", open=False):
                        crop_mode = gr.Radio(["aligned", "box"], value="aligned", label="Crop mode")
                        enhance = gr.Checkbox(label="Enhance the face (GFPGAN; slow on CPU)")
                        reference = gr.Image(label="Target face: a photo of the person to animate (optional)",
                                             type="filepath")
                        with gr.Row():
                            pads = [gr.Number(value=value, label=f"Padding {side}", precision=0)
                                    for side, value in (("top", 0), ("bottom", 10), ("left", 0), ("right", 0))]
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    status = gr.Markdown("Waiting for media.", elem_id="status")
                    video = gr.Video(label="Result", elem_id="result", interactive=False)
                    download = gr.File(label="Download the mp4", elem_id="download", interactive=False)
            run.click(backend.generate, [face, speech, avatar, crop_mode, enhance, reference, *pads],
                      [status, video, download])
        with gr.Tab("Avatars"):
            avatar_table = gr.Dataframe(headers=AVATAR_COLUMNS, interactive=False, elem_id="avatars")
            with gr.Row():
                avatar_face = gr.File(label="Face photo or video", type="filepath", elem_id="avatar-face")
                avatar_name = gr.Textbox(label="Name", elem_id="avatar-name")
            create = gr.Button("Make avatar")
            with gr.Row():
                avatar_id = gr.Textbox(label="Avatar id to delete")
                remove = gr.Button("Delete avatar")
            avatar_status = gr.Markdown(elem_id="avatar-status")
            refresh_avatars = gr.Button("Refresh")

            def refreshed_avatars():
                rows, choices = backend.avatars()
                return rows, gr.Dropdown(choices=choices, value=NO_AVATAR)

            for trigger in (refresh_avatars.click, page.load):
                trigger(refreshed_avatars, None, [avatar_table, avatar])
            create.click(backend.create_avatar, [avatar_face, avatar_name], avatar_status).then(
                refreshed_avatars, None, [avatar_table, avatar])
            remove.click(backend.delete_avatar, avatar_id, avatar_status).then(
                refreshed_avatars, None, [avatar_table, avatar])
        with gr.Tab("Recent jobs"):
            job_table = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, elem_id="jobs")
            refresh_jobs = gr.Button("Refresh", elem_id="refresh-jobs")
            refresh_jobs.click(backend.jobs, None, job_table)
            page.load(backend.jobs, None, job_table)
    return page
