"""A real, throwaway PostgreSQL server for tests: Debian's binaries, loopback only, data in a temp dir.

initdb refuses to run as root, and the tests run as root in CI, so the server runs as the
`postgres` user (runuser) with its data directory in a temp dir that user owns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import free_port


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (/usr/lib/postgresql/<version>/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server on 127.0.0.1 and a free port; yield its SQLAlchemy URL; stop and delete it after."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries are not installed (make setup installs them where it can)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Not under pytest's tmp_path: its parent is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="distvision-pg-"))
    data, port = root / "data", free_port()
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    try:
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off -c max_connections=50"
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                        str(root / "server.log"), "-w", "-t", "60", "start"], check=True, capture_output=True,
                       timeout=90)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
