"""A real S3 endpoint on 127.0.0.1: moto's standalone server in its own process, spoken to
over HTTP by pyarrow's S3 filesystem, as a bucket on object storage would be.

The credentials are the fake ones conftest puts in the environment before Ray starts, so
the driver and every Ray worker find them as they would find a user's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``uri(prefix)``: the dataset.root of ``prefix`` in the bucket; ``upload(folder, prefix)``."""

    bucket = "detexp-data"

    def __init__(self, log: Path):
        self.port = _free_port()
        moto = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        self.fs = pyarrow.fs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}", scheme="http", allow_bucket_creation=True,
        )
        self.fs.create_dir(self.bucket)

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def upload(self, folder: Path, prefix: str) -> str:
        pyarrow.fs.copy_files(str(folder), f"{self.bucket}/{prefix}", destination_filesystem=self.fs)
        return self.uri(prefix)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
