"""What a registry's records cost where they live: a local dir (SQLite, WAL) vs a URL (the append-only log).

For each backend: init a registry on a tiny random Llama, make `--writes` record writes (each one score for
the base, the smallest write there is: one transaction locally, one log entry remotely), then open the
registry afresh and read every version, as each command does when it starts. Backends: the local dir (the
peer every ratio is against), `file://` (the log on the same disk: the protocol's own cost) and, when
moto's server is installed (`.[dev]`), `s3://` through s3fs against it on localhost (real S3 adds network
latency per request: a write is a LIST plus a conditional PUT, an open is a LIST plus a GET per entry not
yet read).

    .venv/bin/python benchmarks/registry_records.py [--writes 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from knowstack.registry import Registry, init_registry


def tiny_base(folder: Path) -> Path:
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def measure(root: str, base: Path, writes: int) -> tuple[float, float]:
    """(seconds per write, seconds to open and read every version) for a new registry at `root`."""
    init_registry(root, base)
    with Registry.open(root) as reg:
        start = time.perf_counter()
        for i in range(writes):
            reg.add_scores("base", [{"task": f"t{i}", "kind": "new", "metric": "accuracy", "value": 0.5}])
        per_write = (time.perf_counter() - start) / writes
    start = time.perf_counter()
    with Registry.open(root) as reg:
        assert len(reg.base()["scores"]) == writes
    return per_write, time.perf_counter() - start


def start_moto() -> tuple[subprocess.Popen, str] | None:
    server_bin = Path(sys.executable).parent / "moto_server"
    if not server_bin.exists():
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(server_bin), "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.terminate()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="knowstack-bench-registry-"))
    os.environ["KNOWSTACK_CACHE"] = str(work / "cache")
    moto = None
    try:
        base = tiny_base(work / "base")
        rows = {"local dir (SQLite)": measure(str(work / "local"), base, args.writes),
                "file:// (log)": measure(f"file://{work / 'shared'}", base, args.writes)}
        moto = start_moto()
        if moto is not None:
            import fsspec

            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            fsspec.config.conf["s3"] = {"endpoint_url": moto[1]}
            fsspec.filesystem("s3").mkdir("bench")
            rows["s3:// (log, moto on localhost)"] = measure("s3://bench/reg", base, args.writes)
        else:
            print("moto_server not installed (pip install -e '.[dev]'): s3:// not measured")
        peer_write, peer_open = rows["local dir (SQLite)"]
        print(f"{args.writes} writes, then open + read every version (ratios against the local dir)")
        print(f"{'backend':34} {'ms/write':>9} {'x':>6} {'open s':>8} {'x':>6}")
        for name, (write, opened) in rows.items():
            print(f"{name:34} {write * 1000:9.2f} {write / peer_write:6.1f} {opened:8.3f} {opened / peer_open:6.1f}")
    finally:
        if moto is not None:
            moto[0].terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
