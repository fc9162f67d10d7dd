"""A real ComfyUI process for the checks in scripts/: start and stop it, its HTTP API, a WebSocket
listener for what it sends the browser, and a probe that reports its model management.

Used by scripts/comfyui_check.py (see there). Written from ComfyUI's server.py and protocol.py
(https://github.com/comfyanonymous/ComfyUI): binary WebSocket messages start with a 4-byte
big-endian event type; type 3 (TEXT, `send_progress_text`) then holds a 4-byte node-id length,
the node id and the text.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# --- report --------------------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.rows.append((status, name, detail))
        print(f"[{status}] {name}" + (f": {detail}" if detail else ""), flush=True)

    def check(self, ok: bool, name: str, detail: str = "") -> bool:
        self.add("PASS" if ok else "FAIL", name, detail)
        return ok

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.rows)

    def summary(self) -> str:
        counts = {s: sum(1 for r in self.rows if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
        return f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"


# --- ComfyUI process and HTTP ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with its own base directory, and its HTTP API."""

    def __init__(
        self,
        comfyui: Path,
        python: str,
        base: Path,
        port: int,
        env: dict[str, str],
        front_end_root: Path | None = None,
    ):
        self.comfyui, self.python, self.base, self.port, self.env = comfyui, python, base, port, env
        self.front_end_root = front_end_root
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = base / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> None:
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
        ]
        if self.front_end_root is not None:
            cmd += ["--front-end-root", str(self.front_end_root)]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfyui, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(1.0)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()

    def post(self, path: str, doc) -> tuple[int, dict]:
        data = json.dumps(doc).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, api: dict, ui: dict | None = None, client_id: str | None = None) -> str:
        doc = {"prompt": api, "client_id": client_id or str(uuid.uuid4())}
        if ui is not None:  # what the frontend sends: the PNG then carries the workflow too
            doc["extra_data"] = {"extra_pnginfo": {"workflow": ui}}
        status, answer = self.post("/prompt", doc)
        if status != 200:
            raise RuntimeError(f"/prompt answered {status}: {json.dumps(answer)[:2000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(poll_s)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def messages(entry: dict) -> dict[str, list]:
    found: dict[str, list] = {}
    for name, data in entry.get("status", {}).get("messages", []):
        found.setdefault(name, []).append(data)
    return found


# --- what ComfyUI sends the browser ----------------------------------------------------------------

TEXT_EVENT = 3  # protocol.BinaryEventTypes.TEXT


class WebSocketTap:
    """Listens on ComfyUI's /ws as a browser tab would (a minimal RFC 6455 client: it only reads).

    `texts` collects (node id, text) of every progress-text message; `events` the JSON messages
    (type, data). Queue prompts with `client_id=tap.client_id` to receive their messages.
    """

    def __init__(self, server: ComfyServer):
        self.client_id = uuid.uuid4().hex
        self.texts: list[tuple[str, str, float]] = []  # (node id, text, time.monotonic())
        self.events: list[tuple[str, dict, float]] = []
        self._sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(1)
            if not chunk:
                raise ConnectionError("ComfyUI closed the WebSocket during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, name="comfyui-ws", daemon=True)
        self._thread.start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read(self) -> None:
        message, kind = b"", 0
        try:
            while True:
                b0, b1 = self._exact(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    (length,) = struct.unpack(">H", self._exact(2))
                elif length == 127:
                    (length,) = struct.unpack(">Q", self._exact(8))
                payload = self._exact(length)  # a server's frames are not masked
                if opcode == 8:
                    return
                if opcode in (1, 2):
                    message, kind = payload, opcode
                elif opcode == 0:
                    message += payload
                else:
                    continue  # ping/pong
                if b0 & 0x80:  # the last frame of the message
                    self._take(kind, message)
        except (OSError, ConnectionError):
            return

    def _take(self, kind: int, message: bytes) -> None:
        now = time.monotonic()
        if kind == 1:
            doc = json.loads(message)
            self.events.append((doc.get("type"), doc.get("data") or {}, now))
            return
        (event,) = struct.unpack(">I", message[:4])
        if event == TEXT_EVENT:
            (size,) = struct.unpack(">I", message[4:8])
            node_id = message[8 : 8 + size].decode()
            self.texts.append((node_id, message[8 + size :].decode("utf-8", "replace"), now))

    def close(self) -> None:
        self._sock.close()


# --- a probe of ComfyUI's model management -----------------------------------------------------------

PROBE_FOLDER = "zz_flux_check_probe"
PROBE_ROUTE = "/flux_check/loaded_models"
PROBE_SOURCE = '''"""Test-only custom node put in by scripts/comfyui_check.py: lists comfy.model_management's
current_loaded_models at GET /flux_check/loaded_models. It defines no node."""

import comfy.model_management as mm
import server
from aiohttp import web

NODE_CLASS_MAPPINGS = {}


@server.PromptServer.instance.routes.get("/flux_check/loaded_models")
async def loaded_models(request):
    rows = []
    for entry in list(mm.current_loaded_models):
        patcher = entry.model
        model = getattr(patcher, "model", None)
        rows.append(
            {
                "patcher": type(patcher).__name__,
                "model": type(model).__name__,
                "bytes": int(patcher.model_size()),
                "loaded_bytes": int(patcher.loaded_size()),
                "device": str(entry.device),
            }
        )
    return web.json_response(rows)
'''


def install_probe(base: Path) -> None:
    folder = base / "custom_nodes" / PROBE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(PROBE_SOURCE, encoding="utf-8")


def loaded_models(server: ComfyServer) -> list[dict]:
    """What ComfyUI's model management holds now (through the probe)."""
    return server.get(PROBE_ROUTE)
