"""A real TURN server (coturn) on loopback, with a shared secret as deployments configure it (use-auth-secret)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from pathlib import Path

from .paths import system_binary
from .processes import free_port_block
from .waiting import eventually

RELAY_PORTS = 100  # relay addresses it may allocate, on the ports after its listening one


class TurnServer:
    """coturn listening on 127.0.0.1 (UDP and TCP), relaying on loopback ports, its log in `folder`/turn.log.
    Loopback peers are allowed, which coturn refuses by default: here both peers are on this machine."""

    def __init__(self, folder: Path, secret: str, realm: str = "swl.test") -> None:
        self.port = free_port_block(RELAY_PORTS + 1)
        self.url = f"turn:127.0.0.1:{self.port}?transport=udp"
        self.log = Path(folder) / "turn.log"
        command = [system_binary("turnserver"), "-n", "--listening-ip=127.0.0.1", f"--listening-port={self.port}",
                   "--relay-ip=127.0.0.1", f"--min-port={self.port + 1}", f"--max-port={self.port + RELAY_PORTS}",
                   "--use-auth-secret", f"--static-auth-secret={secret}", f"--realm={realm}", "--no-cli",
                   "--no-tls", "--no-dtls", "--allow-loopback-peers", f"--db={Path(folder) / 'turndb'}",
                   f"--pidfile={Path(folder) / 'turn.pid'}", "--log-file=stdout", "--simple-log", "--verbose"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        eventually(self._listening, seconds=20, what=f"coturn listening on UDP {self.port} (its log: {self.log})")

    def _listening(self) -> bool:
        """Answers a STUN binding request over UDP, as the peers' first message to it is."""
        assert self.process.poll() is None, f"coturn exited with {self.process.returncode}:\n{self.log.read_text()}"
        transaction = os.urandom(12)
        request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + transaction  # RFC 5389: type, length, magic cookie
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.5)
            probe.sendto(request, ("127.0.0.1", self.port))
            try:
                answer = probe.recv(2048)
            except OSError:  # not yet listening: a timeout, or the port refused
                return False
        return answer[:2] == b"\x01\x01" and answer[8:20] == transaction  # a binding success for this request

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
