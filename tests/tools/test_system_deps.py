"""`make deps`: what it does when system programs are missing and it may not install them."""

from __future__ import annotations

from tools import system_deps


def test_without_root_or_sudo_it_stops_at_once_with_the_exact_command(monkeypatch, capsys):
    present = {"curl", "openssl", "apt-get"}
    monkeypatch.setattr(system_deps.shutil, "which", lambda name: f"/usr/bin/{name}" if name in present else None)
    monkeypatch.setattr(system_deps.os, "geteuid", lambda: 1000)
    calls = []
    monkeypatch.setattr(system_deps.subprocess, "run", lambda *a, **k: calls.append(a) or None)
    assert system_deps.main() == 2
    message = capsys.readouterr().err
    assert "sudo apt-get install -y -q --no-install-recommends chromium coturn ffmpeg redis-server" in message, message
    assert calls == []  # no apt-get was attempted (sudo itself is absent)


def test_a_missing_binary_names_its_package_and_the_fix(monkeypatch):
    monkeypatch.setattr(system_deps.shutil, "which", lambda name: None)
    try:
        system_deps.require("ffprobe")
    except RuntimeError as error:
        assert "ffprobe is not installed" in str(error) and "make deps" in str(error) and "ffmpeg" in str(error)
    else:
        raise AssertionError("require() accepted a missing binary")
