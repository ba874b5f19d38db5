"""The Gradio page: sign in with your own API key; generate (upload, record or pick an avatar; options; live
progress; play and download), manage avatars, see recent jobs. Every call goes through the SDK with the signed-in
visitor's key; errors are shown as messages, never tracebacks.

The key is kept in the visitor's `gr.State`, which lives on this server, one per browser tab: Gradio sends a
State's value to no browser, and feeds it to a handler from the server's session store, never from the request,
so a handler's "signed in?" check cannot be bypassed by calling the API directly. The UI holds no key of its own
and caches no list: each table is what the gateway returned for that visitor's key."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import grpc
from superwav2lip.gateway.v1 import gateway_pb2
from superwav2lip_client import Client, Progress, Result, SuperWav2LipError

from .live import live_tab
from .settings import WebUISettings

log = logging.getLogger(__name__)
NO_AVATAR = "(none: use the uploaded face)"
JOB_COLUMNS = ["job", "state", "created", "progress or error"]
AVATAR_COLUMNS = ["avatar", "name", "size", "frames", "created"]
SIGN_IN_FIRST = "Sign in first: enter your API key at the top of the page."
SIGNED_OUT = "Sign in with your API key to generate and to see your avatars and jobs."
SIGN_IN_TIMEOUT_S = 30.0  # the sign-in check is one listing: a gateway that takes longer is not answering
WAITING = "Waiting for media."
SIGNED_OUT_MEANWHILE = "Signed out while that call ran: its outcome is not shown."
SIGNED_IN = "Signed in with your key: the avatars and jobs here are your tenant's."
SIGNED_IN_ANONYMOUS = ("Signed in without a key: **this gateway accepts calls without a key**, so everyone who uses "
                       "it acts as one anonymous tenant and shares its avatars and jobs.")


@dataclasses.dataclass
class Visitor:
    """One signed-in browser tab: the key it signed in with ("" on a gateway that accepts calls without one).
    Held in the tab's gr.State on this server; the key is left out of repr, so it is never logged by accident."""

    key: str = dataclasses.field(repr=False)
    gone: bool = False  # signed out: a call still running for this visitor shows nothing more

    @property
    def anonymous(self) -> bool:
        return not self.key

    def sign_out(self) -> None:
        """Forgets the key. The tab's State is emptied too; this object is what calls still running hold."""
        self.key, self.gone = "", True


def signed_in(visitor: Visitor | None) -> Visitor:
    """The tab's visitor; refuses the call, with a message, when the tab has not signed in (or signed out)."""
    if visitor is None or visitor.gone:
        raise shown(SIGN_IN_FIRST)
    return visitor


def still_signed_in(visitor: Visitor) -> None:
    """After a call: its outcome is not shown when the visitor signed out meanwhile (the tab was cleared)."""
    if visitor.gone:
        raise shown(SIGNED_OUT_MEANWHILE)


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
    """The UI's calls to the gateway, each with the key of the visitor it is made for; it holds no key itself."""

    def __init__(self, settings: WebUISettings) -> None:
        self.settings = settings
        self.outputs = Path(tempfile.mkdtemp(prefix="superwav2lip-webui-"))

    def client(self, visitor: Visitor, timeout: float | None = None) -> Client:
        # The key is always passed as a string: None would make the SDK fall back to SUPERWAV2LIP_API_KEY from
        # this server's environment, a shared key by another name; "" sends none.
        return Client(self.settings.gateway_address, api_key=visitor.key, timeout=timeout or self.settings.timeout_s)

    def sign_in(self, key: str | None) -> tuple[Visitor | None, str, list[list]]:
        """(the visitor, or None when refused; the message for the page; the visitor's recent jobs). The key is
        checked by listing the visitor's jobs, which the gateway refuses as UNAUTHENTICATED for a wrong key."""
        visitor = Visitor((key or "").strip())
        try:
            with self.client(visitor, timeout=SIGN_IN_TIMEOUT_S) as client:
                jobs = client.list_jobs()
        except SuperWav2LipError as error:
            log.warning("sign-in refused", extra={"code": error.code.name, "request_id": error.request_id})
            if error.code != grpc.StatusCode.UNAUTHENTICATED:
                return None, f"**Cannot sign in:** {readable(error)}", []
            if visitor.anonymous:
                return None, "**This gateway needs an API key:** enter yours to sign in.", []
            return None, "**Wrong key:** the gateway does not accept it. Check it and sign in again.", []
        log.info("signed in", extra={"anonymous": visitor.anonymous})
        return visitor, SIGNED_IN_ANONYMOUS if visitor.anonymous else SIGNED_IN, _job_rows(jobs)

    def generate(self, visitor: Visitor | None, face: str | None, speech: str | None, avatar: str, crop_mode: str,
                 enhance: bool, reference: str | None, pad_top: float, pad_bottom: float, pad_left: float,
                 pad_right: float) -> Iterator[tuple[str, str | None, str | None]]:
        """Yields (status, video, download) as the job runs: each progress event updates the status line, and a
        refusal or failure ends there as a readable message."""
        visitor = signed_in(visitor)
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
            with self.client(visitor) as client:
                for event in client.generate_events(None if use_avatar else face, speech,
                                                    avatar=avatar.split(" ", 1)[0] if use_avatar else None,
                                                    **options):
                    if visitor.gone:  # signed out meanwhile: the page was cleared; closing the client ends the call
                        log.info("generation dropped: the visitor signed out")
                        return
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

    def avatars(self, visitor: Visitor | None) -> tuple[list[list], list[str]]:
        """(table rows, dropdown choices); on failure the table says why instead of raising."""
        visitor = signed_in(visitor)
        try:
            with self.client(visitor) as client:
                avatars = client.list_avatars()
        except SuperWav2LipError as error:
            return [[f"cannot list avatars: {readable(error)}", "", "", "", ""]], [NO_AVATAR]
        rows = [[a.avatar_id, a.name, f"{a.width}x{a.height}", a.frames, _when(a.created_unix)] for a in avatars]
        return rows, [NO_AVATAR] + [f"{a.avatar_id} {a.name}".strip() for a in avatars]

    def create_avatar(self, visitor: Visitor | None, face: str | None, name: str) -> str:
        visitor = signed_in(visitor)
        if not face:
            raise shown("Add a face photo or video to make an avatar from.")
        try:
            with self.client(visitor) as client:
                avatar = client.create_avatar(face, name=name or Path(face).name)
        except SuperWav2LipError as error:
            raise shown(readable(error)) from None
        still_signed_in(visitor)
        return f"Made avatar {avatar.avatar_id} ({avatar.frames} frames)."

    def delete_avatar(self, visitor: Visitor | None, avatar_id: str) -> str:
        visitor = signed_in(visitor)
        if not avatar_id.strip():
            raise shown("Type the id of the avatar to delete.")
        try:
            with self.client(visitor) as client:
                client.delete_avatar(avatar_id.strip())
        except SuperWav2LipError as error:
            raise shown(readable(error)) from None
        still_signed_in(visitor)
        return f"Deleted {avatar_id.strip()}."

    def jobs(self, visitor: Visitor | None) -> list[list]:
        visitor = signed_in(visitor)
        try:
            with self.client(visitor) as client:
                jobs = client.list_jobs()
        except SuperWav2LipError as error:
            return [[f"cannot list jobs: {readable(error)}", "", "", ""]]
        return _job_rows(jobs)


def _job_rows(jobs: list[gateway_pb2.Job]) -> list[list]:
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
        # This tab's visitor (None: not signed in). Kept on the server; Gradio never sends a State to the browser.
        visitor = gr.State(None)
        gr.Markdown("# Super Wav2Lip\nA face photo or video and a speech track in; the face speaking it out.")
        with gr.Row(elem_id="sign-in-form") as sign_in_form:
            key_box = gr.Textbox(label="Your API key", type="password", elem_id="api-key", scale=4,
                                 info="Kept on this page's server for this browser tab only, and sent to the "
                                      "gateway with each of your calls. Leave it empty if the gateway accepts "
                                      "calls without a key.")
            sign_in = gr.Button("Sign in", variant="primary", elem_id="sign-in", scale=1)
        with gr.Row(equal_height=True):
            account = gr.Markdown(SIGNED_OUT, elem_id="account")
            sign_out = gr.Button("Sign out", elem_id="sign-out", visible=False, size="sm", scale=0, min_width=120)
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
                    status = gr.Markdown(WAITING, elem_id="status")
                    video = gr.Video(label="Result", elem_id="result", interactive=False)
                    download = gr.File(label="Download the mp4", elem_id="download", interactive=False)
            run.click(backend.generate, [visitor, face, speech, avatar, crop_mode, enhance, reference, *pads],
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
            refresh_avatars = gr.Button("Refresh", elem_id="refresh-avatars")

            def refreshed_avatars(current: Visitor | None):
                rows, choices = backend.avatars(current)
                return rows, gr.Dropdown(choices=choices, value=NO_AVATAR)

            refreshed = refresh_avatars.click(refreshed_avatars, visitor, [avatar_table, avatar])
            create.click(backend.create_avatar, [visitor, avatar_face, avatar_name], avatar_status).success(
                refreshed_avatars, visitor, [avatar_table, avatar])
            remove.click(backend.delete_avatar, [visitor, avatar_id], avatar_status).success(
                refreshed_avatars, visitor, [avatar_table, avatar])
        with gr.Tab("Live"):
            live_avatar = live_tab(settings, signed_in, visitor)
        with gr.Tab("Recent jobs"):
            job_table = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, elem_id="jobs")
            refresh_jobs = gr.Button("Refresh", elem_id="refresh-jobs")
            refresh_jobs.click(backend.jobs, visitor, job_table, api_name="jobs")

        def signing_in(key: str | None):
            """Checks the typed key with the gateway; keeps it in this tab's State only when accepted. The key box
            is emptied either way, so the key is not left in the page."""
            signed, message, jobs = backend.sign_in(key)
            if signed is None:
                return None, "", gr.Row(visible=True), gr.Button(visible=False), message, *cleared()
            rows, choices = backend.avatars(signed)
            return (signed, "", gr.Row(visible=False), gr.Button(visible=True), message, rows,
                    gr.Dropdown(choices=choices, value=NO_AVATAR), jobs, WAITING, None, None, "")

        def signing_out(current: Visitor | None):
            """Forgets this tab's key, and clears what was shown for it, so the next person at this browser sees
            nothing of it; a generation still running for it stops at its next event."""
            if current is not None:
                current.sign_out()
            log.info("signed out")
            return None, "", gr.Row(visible=True), gr.Button(visible=False), SIGNED_OUT, *cleared()

        def cleared():
            return ([], gr.Dropdown(choices=[NO_AVATAR], value=NO_AVATAR), [], WAITING, None, None, "")

        account_outputs = [visitor, key_box, sign_in_form, sign_out, account, avatar_table, avatar, job_table,
                           status, video, download, avatar_status]
        def live_avatars(current: Visitor | None):
            choices = backend.avatars(current)[1][1:] if current is not None and not current.gone else []
            return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

        for event in (sign_in.click(signing_in, key_box, account_outputs),
                      key_box.submit(signing_in, key_box, account_outputs),
                      sign_out.click(signing_out, visitor, account_outputs)):
            event.then(live_avatars, visitor, live_avatar)
        refreshed.then(live_avatars, visitor, live_avatar)
    return page
