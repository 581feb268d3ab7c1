"""A Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, started as real processes
(``flower-superlink``, ``flower-supernode``), optionally with TLS, for tests, benchmarks and trying a deployment
before moving it to real machines (docs/deployment.md has the multi-machine commands).

    with LoopbackFederation(num_nodes=3, workdir=Path("fl"), tls=True) as fed:
        fed.run(app_dir=Path("."), run_config={"config": "examples/tiny.toml", "out-dir": "/tmp/run"})

Every process is started in its own session and stopped by its process group on exit (the SuperLink's and
SuperNodes' SuperExec children and app processes included), so nothing is left running.
"""
from __future__ import annotations

import datetime as _dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no calls home: the network is closed here, and users may want none
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` a CUDA torch into a run environment
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for ``127.0.0.1``/``localhost`` (PEM files in ``folder``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP384R1())

    def write_key(k, path):
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = key()
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
              .not_valid_after(now + _dt.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, paths["key"])
    return paths


class LoopbackFederation:
    """SuperLink + SuperNodes on loopback; :meth:`run` submits the app with ``flwr run`` and waits for it."""

    def __init__(self, num_nodes: int, workdir: Path, tls: bool = False, node_config: dict[int, str] | None = None,
                 auth: bool = False):
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.num_nodes, self.workdir, self.tls, self.auth = num_nodes, Path(workdir).resolve(), tls, auth
        self.node_config = node_config or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.bin = Path(sys.executable).parent
        import tempfile

        self.worker_dir = Path(tempfile.mkdtemp(prefix="fedlora-"))  # short: AF_UNIX socket paths are limited
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.workdir / "flwr_home"),
                    "FEDLORA_WORKER_DIR": str(self.worker_dir),
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        self.certs: dict[str, Path] = {}

    # -------------------------------------------------------------------------------------------- processes
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def __enter__(self) -> "LoopbackFederation":
        try:
            return self._start_all()
        except BaseException:
            self.__exit__(None, None, None)  # a failed start (say, a node's registration) leaves nothing running
            raise

    def _start_all(self) -> "LoopbackFederation":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "flwr_home").mkdir(exist_ok=True)
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs")
            link_security = ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                             "--ssl-keyfile", str(self.certs["key"])]
            node_security = ["--root-certificates", str(self.certs["ca"])]
        else:
            link_security, node_security = ["--insecure"], ["--insecure"]
        if self.auth:
            link_security.append("--enable-supernode-auth")
        self._start("superlink", [str(self.bin / "flower-superlink"), *link_security, "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        connection = [f'address = "127.0.0.1:{self.port}"']
        connection.append(f'root-certificates = "{self.certs["ca"]}"' if self.tls else "insecure = true")
        (self.workdir / "flwr_home" / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n' + "\n".join(connection) + "\n")
        for k in range(self.num_nodes):
            if self.auth:
                self.register_node(self.node_keys(k)[1])
            self.start_node(k, node_security)
        return self

    def node_keys(self, k: int) -> tuple[Path, Path]:
        """SuperNode ``k``'s EC P-384 key pair (private, public), made on first use."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        private, public = self.workdir / "certs" / f"node{k}.key", self.workdir / "certs" / f"node{k}.pub"
        if not private.exists():
            key = ec.generate_private_key(ec.SECP384R1())
            # the OpenSSH formats `ssh-keygen -t ecdsa -b 384` writes, which Flower expects
            private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
            public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH))
        return private, public

    def register_node(self, public_key: Path, attempts: int = 60) -> None:
        """``flwr supernode register`` (retried while the SuperLink starts)."""
        for _ in range(attempts):
            res = subprocess.run([str(self.bin / "flwr"), "supernode", "register", str(public_key), "loopback"],
                                 env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=60)
            if res.returncode == 0:
                return
            time.sleep(1.0)
        raise RuntimeError(f"could not register {public_key}: {res.stdout[-500:]} {res.stderr[-500:]}")

    def start_node(self, k: int, security: list[str] | None = None) -> subprocess.Popen:
        if security is None:
            security = ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        if self.auth:
            private, public = self.node_keys(k)
            security = [*security, "--auth-supernode-private-key", str(private),
                        "--auth-supernode-public-key", str(public)]
        config = f"partition-id={k} num-partitions={self.num_nodes}"
        if self.node_config.get(k):
            config += " " + self.node_config[k]
        return self._start(f"supernode{k}", [str(self.bin / "flower-supernode"), *security, "--superlink",
                                             f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                             "--node-config", config])

    def stop_node(self, k: int) -> None:
        """Kill SuperNode ``k`` and everything it started (SIGKILL: a crash, not a shutdown)."""
        _kill_group(self.procs.pop(f"supernode{k}"), signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        for name in sorted(self.procs, key=lambda n: n == "superlink"):  # the nodes first, then the link
            _kill_group(self.procs[name], signal.SIGTERM)
        self.procs.clear()
        import shutil

        for log in self.worker_dir.glob("*.log"):  # the nodes' worker logs are kept with the federation's logs
            shutil.copy(log, self.workdir / log.name)
        shutil.rmtree(self.worker_dir, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- runs
    def run(self, app_dir: Path, run_config: dict, timeout: float = 900, on_line=None) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR loopback --stream --run-config …`` and wait for the run to finish."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        args = [str(self.bin / "flwr"), "run", str(Path(app_dir).resolve()), "loopback", "--stream",
                "--run-config", items]
        proc = subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=self.workdir, start_new_session=True)
        self.procs["flwr-run"] = proc
        lines, deadline = [], time.time() + timeout
        try:
            for line in proc.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line)
                if time.time() > deadline:
                    raise TimeoutError(f"flwr run did not finish in {timeout} s:\n{''.join(lines[-30:])}")
            proc.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            _kill_group(self.procs.pop("flwr-run"), signal.SIGTERM)
        out = "".join(lines)
        failed = proc.returncode != 0 or "ServerApp raised an exception" in out  # `flwr run` itself exits 0 then
        return subprocess.CompletedProcess(args, 1 if failed else 0, out, "")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a process group started with ``start_new_session`` and reap it (SIGKILL after 10 s)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    try:  # children that outlived their parent in the same group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
