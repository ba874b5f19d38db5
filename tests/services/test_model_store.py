"""`make models`: verification by sha256 and plain messages when weights cannot be had."""

import hashlib
import json
import shutil

from service_runtime import model_store
from service_runtime.manifest import load_manifest

from tests.support.paths import ROOT


def models_folder(tmp_path, **changes):
    shutil.copy(ROOT / "models" / "manifest.json", tmp_path / "manifest.json")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for name, fields in changes.items():
        raw["models"][name].update(fields)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    return tmp_path


def test_a_file_with_the_right_checksum_is_accepted_and_a_wrong_one_named(tmp_path):
    data = b"pretend weights"
    folder = models_folder(tmp_path, wav2lip={"sha256": hashlib.sha256(data).hexdigest()})
    spec = load_manifest(folder).get("wav2lip")
    (folder / spec.file).write_bytes(data)
    assert model_store.verify(spec, folder / spec.file) is None
    (folder / spec.file).write_bytes(data + b"!")
    assert "does not match the manifest" in model_store.verify(spec, folder / spec.file)


def test_unreachable_download_says_so_and_leaves_nothing_behind(tmp_path, capsys):
    folder = models_folder(tmp_path, wav2lip={"url": "http://127.0.0.1:9/wav2lip.onnx"})
    missing = model_store.fetch_all(folder, ["wav2lip", "wav2lip_gan"])
    out = capsys.readouterr().out
    assert missing == 2
    assert "failed   wav2lip.onnx" in out and "no internet here?" in out
    assert "manual   wav2lip_gan.onnx: no public download address" in out
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]


def test_a_mirror_fills_an_empty_models_volume_and_refuses_a_corrupt_copy(tmp_path, capsys):
    """The init container's path: manifest in the image, weights fetched from a mirror into an empty volume."""
    import functools
    import http.server
    import threading

    good, corrupt = b"lipsync weights", b"tampered weights"
    (tmp_path / "image").mkdir()
    manifest = models_folder(tmp_path / "image", wav2lip_gan={"sha256": hashlib.sha256(good).hexdigest()},
                             **{"gfpgan_v1.4": {"sha256": hashlib.sha256(b"the real gfpgan").hexdigest()}})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "wav2lip_gan.onnx").write_bytes(good)
    (mirror / "GFPGANv1.4.onnx").write_bytes(corrupt)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        volume = tmp_path / "volume"
        missing = model_store.fetch_all(volume, ["wav2lip_gan", "gfpgan_v1.4"], manifest,
                                        f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert missing == 1
    assert (volume / "wav2lip_gan.onnx").read_bytes() == good
    assert "failed   GFPGANv1.4.onnx" in out and "does not match the manifest" in out
    assert sorted(p.name for p in volume.iterdir()) == ["wav2lip_gan.onnx"]
