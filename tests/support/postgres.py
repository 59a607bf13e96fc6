"""A throwaway PostgreSQL server for tests: initdb into a temp dir, start on a free port, remove.

The server binaries come from Debian's packages (/usr/lib/postgresql/<version>/bin); `make test`
installs them when they are missing. PostgreSQL refuses to run as root, so when the tests run as
root the server runs as the `postgres` OS user (created by the Debian package).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PG_ROOT = Path("/usr/lib/postgresql")
USER = "loraplex"  # the database superuser (auth=trust, so no password)
OS_USER = "postgres"  # who runs the server when we are root
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_INITDB_FLAGS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
# Speed over durability: the data is thrown away after the tests.
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def find_pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl, or None."""

    def version(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", bin_dir.parent.name)) or (0,)

    found = [
        d
        for d in PG_ROOT.glob("*/bin")
        if all(os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl"))
    ]
    return max(found, key=version, default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The environment without PG* variables (PGHOST, PGSERVICE, ...) that would redirect tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # plain, untranslated tool messages
    return env


class PostgresServer:
    """A private PostgreSQL server on 127.0.0.1 with trust auth; use as a context manager.

    `url` is the SQLAlchemy URL of the database made at start; `create_database(name)` makes
    another, empty one and returns its URL.
    """

    def __init__(self, dbname: str = "loraplex", bin_dir: Path | None = None) -> None:
        self.dbname = _check_name(dbname)
        self.bin_dir = bin_dir or find_pg_bin()
        self.port = 0
        self.root: Path | None = None  # temp dir: data/ (also the unix socket dir) and the log
        self._as_server_user: list[str] = []  # runuser prefix when we are root
        self.startup_seconds = 0.0  # initdb + start + createdb, for the curious

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database created at start."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{dbname}"

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb into a new temp dir, start the server, create `dbname`. Cleans up on failure."""
        if self.root is not None:
            raise RuntimeError("PostgresServer already started")
        begun = time.monotonic()
        self._as_server_user = self._server_user_prefix()
        self.root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        try:
            self._initdb()
            self._start_server()
            self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - begun

    def stop(self) -> None:
        """Stop the server (immediate mode) and remove its directory. Safe to call twice."""
        if self.root is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(
                    [self._tool("pg_ctl"), "stop", "-D", self.data_dir, "-m", "immediate", "-w"],
                    as_server=True,
                    check=False,
                    timeout=60,
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        cmd = [self._tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER]
        self._run([*cmd, _check_name(name)], timeout=60)
        return self.url_for(name)

    # -- internals -------------------------------------------------------------------------------

    def _tool(self, name: str) -> Path:
        if self.bin_dir is None or not os.access(self.bin_dir / name, os.X_OK):
            where = self.bin_dir or f"{PG_ROOT}/*/bin"
            raise RuntimeError(
                f"PostgreSQL server binary {name!r} not found in {where}; run `make test` (it "
                "installs them) or `apt-get install --no-install-recommends postgresql`"
            )
        return self.bin_dir / name

    def _server_user_prefix(self) -> list[str]:
        """Command prefix that runs the server tools as a non-root user ([] if we aren't root)."""
        for tool in ("initdb", "pg_ctl", "createdb"):
            self._tool(tool)  # fail early and clearly
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, and PostgreSQL refuses to; but there is no {OS_USER!r} OS user "
                "to run it as (the Debian postgresql package creates one)"
            ) from None
        if runuser := shutil.which("runuser"):
            return [runuser, "-u", OS_USER, "--"]
        if setpriv := shutil.which("setpriv"):
            return [setpriv, f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", "--"]
        raise RuntimeError("running as root but neither runuser nor setpriv is available")

    def _initdb(self) -> None:
        assert self.root is not None
        if self._as_server_user:
            shutil.chown(self.root, user=OS_USER, group=OS_USER)
            probe = self._run(["test", "-w", self.root], as_server=True, check=False)
            if probe.returncode != 0:
                raise RuntimeError(
                    f"the {OS_USER!r} OS user cannot write {self.root}; point TMPDIR at a "
                    "directory every user can reach (e.g. /tmp)"
                )
        initdb = [self._tool("initdb"), "-D", self.data_dir, "-U", USER, *_INITDB_FLAGS]
        self._run(initdb, as_server=True, timeout=120)
        settings = {**_SETTINGS, "unix_socket_directories": str(self.data_dir)}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres.py\n")
            conf.writelines(f"{k} = '{v}'\n" for k, v in settings.items())

    def _start_server(self) -> None:
        """pg_ctl start -w on a free port; retry with a new port if another process took it."""
        for attempt in range(3):
            self.port = _free_port()
            self.log_file.unlink(missing_ok=True)
            pg_ctl = [self._tool("pg_ctl"), "start", "-w", "-t", "60", "-D", self.data_dir]
            pg_ctl += ["-l", self.log_file, "-o", f"-p {self.port}"]
            started = self._run(pg_ctl, as_server=True, check=False, timeout=90)
            if started.returncode == 0:
                return
            log = self._log_tail()
            if "could not bind" not in log or attempt == 2:
                raise RuntimeError(
                    f"pg_ctl start failed ({started.returncode}): {started.stderr.strip()}\n"
                    f"server log:\n{log}"
                )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _run(
        self,
        cmd: list[str | Path],
        *,
        as_server: bool = False,
        check: bool = True,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        prefix = self._as_server_user if as_server else []
        argv = [*prefix, *map(str, cmd)]
        result = subprocess.run(
            argv,
            cwd=self.root,  # a dir the server user can enter (not e.g. /root)
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result


def _check_name(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
    return name
