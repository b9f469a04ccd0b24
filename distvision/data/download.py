"""The official CIFAR-10 download, checksum-verified, into the user's cache directory."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from distvision.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download_cifar10(cache_dir: Path, url: str = CIFAR10_URL, timeout: float = 30.0) -> Path:
    """Return the path of cifar-10-python.tar.gz, downloading it (with a progress bar) if needed."""
    target = Path(cache_dir) / "downloads" / "cifar-10-python.tar.gz"
    if target.is_file() and _md5(target) == CIFAR10_MD5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # concurrent ranks never share one
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            from tqdm import tqdm

            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10", disable=None) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"cannot download CIFAR-10 from {url} ({getattr(error, 'reason', error)}); "
            "without network, pass a local copy: --data /path/to/cifar10 (make train DATA=/path/to/cifar10)"
        ) from None
    if _md5(partial) != CIFAR10_MD5:
        partial.unlink(missing_ok=True)
        raise UserError(f"the CIFAR-10 download from {url} failed its checksum; try again or pass a local copy with --data")
    os.replace(partial, target)
    return target
