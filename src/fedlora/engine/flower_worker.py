"""A SuperNode's long-lived fedlora worker: keeps the base model, the data and the method loaded across messages.

Flower 1.41 runs a deployment's ClientApp in a new ``flwr-clientapp`` process for every message; importing
transformers and PEFT and loading the model there costs seconds per message.  The ClientApp therefore relays a
round to this worker over a Unix socket (file mode 0600, in the temporary directory, one per SuperNode) and starts it
on first use.  It runs in the SuperNode's process group, so stopping the SuperNode's group stops it, and it exits by
itself after ``FEDLORA_WORKER_IDLE_S`` seconds without work (default 900).

Protocol, one request per connection: an 8-byte length and a JSON header, then the header's ``download`` bytes;
the answer is an 8-byte length and a JSON header (``update`` text, or ``error``), then the upload bytes.  JSON and
safetensors only — nothing is unpickled.

    python -m fedlora.engine.flower_worker --socket PATH
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

START_TIMEOUT_S = 120.0


def socket_path(node_id: int) -> Path:
    """One socket per SuperNode, in ``$FEDLORA_WORKER_DIR`` (default: the temporary directory)."""
    tag = hashlib.sha256(f"{os.getuid()}:{node_id}".encode()).hexdigest()[:16]
    folder = os.environ.get("FEDLORA_WORKER_DIR") or tempfile.gettempdir()
    path = Path(folder) / f"fedlora-worker-{tag}.sock"
    return path if len(str(path)) < 100 else Path(tempfile.gettempdir()) / path.name  # AF_UNIX path limit


def _send(conn: socket.socket, header: dict, payload: bytes) -> None:
    head = json.dumps({**header, "payload": len(payload)}).encode()
    conn.sendall(struct.pack("<Q", len(head)) + head)
    conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(1 << 20, n - got))
        if not chunk:
            raise ConnectionError("the fedlora worker connection closed early")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", _recv_exact(conn, 8))
    header = json.loads(_recv_exact(conn, size))
    return header, _recv_exact(conn, int(header["payload"]))


def call_worker(node_id: int, config_text: str, data_dir: str | None, plan_text: str, round_idx: int,
                download: bytes, partition: int, memory_text: str = "", merge: bytes = b"",
                base_state: bytes | None = None) -> tuple[bytes, str, bytes]:
    """Run a client's round in this node's worker (started if none answers): :func:`local_round`'s result."""
    header, payload = _call(node_id, {"op": "train", "config": config_text, "data_dir": data_dir, "plan": plan_text,
                                      "round": round_idx, "partition": partition, "memory": memory_text,
                                      "sizes": [len(download), len(merge)], "has_state": base_state is not None},
                            download + merge + (base_state or b""))
    cut = int(header["upload_bytes"])
    return payload[:cut], header["update"], payload[cut:]


def call_worker_evaluate(node_id: int, config_text: str, data_dir: str | None, shared: bytes, partition: int,
                         base_state: bytes | None = None) -> str:
    """A personalised evaluation in this node's worker: :func:`local_evaluate`'s result."""
    header, _ = _call(node_id, {"op": "evaluate", "config": config_text, "data_dir": data_dir, "partition": partition,
                                "sizes": [len(shared)], "has_state": base_state is not None},
                      shared + (base_state or b""))
    return header["result"]


def _call(node_id: int, header: dict, payload: bytes) -> tuple[dict, bytes]:
    """Send one request to this node's worker, starting it if none answers."""
    path = socket_path(node_id)
    conn = _connect(path)
    if conn is None:
        log = open(str(path) + ".log", "ab")
        subprocess.Popen([sys.executable, "-m", "fedlora.engine.flower_worker", "--socket", str(path)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True)
        deadline = time.time() + START_TIMEOUT_S
        while conn is None and time.time() < deadline:
            time.sleep(0.1)
            conn = _connect(path)
        if conn is None:
            raise RuntimeError(f"the fedlora worker did not start within {START_TIMEOUT_S:.0f} s (log: {path}.log)")
    with conn:
        _send(conn, header, payload)
        reply, data = _recv(conn)
    if "error" in reply:
        raise RuntimeError(f"fedlora worker: {reply['error']}")
    return reply, data


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def serve(path: Path, idle_s: float) -> None:
    import signal

    from fedlora.engine.flower_client import local_evaluate, local_round

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # runs the clean-up below

    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.umask(old)
    server.listen(4)
    server.settimeout(5.0)
    last = time.time()
    try:
        while time.time() - last < idle_s:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    req, payload = _recv(conn)
                    if req.get("op") == "evaluate":
                        (a,) = (int(n) for n in req["sizes"])
                        result = local_evaluate(req["config"], req["data_dir"], payload[:a], int(req["partition"]),
                                                payload[a:] if req["has_state"] else None)
                        _send(conn, {"result": result}, b"")
                        continue
                    a, b = (int(n) for n in req["sizes"])
                    blob, update, state = local_round(req["config"], req["data_dir"], req["plan"], int(req["round"]),
                                                      payload[:a], int(req["partition"]), req["memory"],
                                                      payload[a:a + b], payload[a + b:] if req["has_state"] else None)
                    _send(conn, {"update": update, "upload_bytes": len(blob)}, blob + state)
                except Exception as exc:  # noqa: BLE001 - the reason goes back to the ServerApp as a client error
                    traceback.print_exc()
                    try:
                        _send(conn, {"error": f"{type(exc).__name__}: {exc}"}, b"")
                    except OSError:
                        pass
            last = time.time()
    finally:
        server.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--idle", type=float, default=float(os.environ.get("FEDLORA_WORKER_IDLE_S", 900)))
    args = ap.parse_args(argv)
    serve(Path(args.socket), args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
