"""Take a screenshot of Flower's dashboard with live smmf-queue workers (headless Chromium).

Starts a standalone stack of configs/local.toml on free ports, Flower, runs a few jobs, and
saves docs/flower-workers.png and docs/flower-tasks.png. Needs Debian's `chromium`.

    .venv/bin/python scripts/screenshot_flower.py
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smmf_queue import Client, load_config  # noqa: E402
from smmf_queue.standalone import Stack  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shoot(url: str, out: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                        "--window-size=1400,800", "--virtual-time-budget=8000",
                        "--hide-scrollbars", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    print(out)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="smmf-flower-"))
    flower_port = free_port()
    config_path = work / "flower.toml"
    config_path.write_text((ROOT / "configs" / "local.toml").read_text()
                           .replace("${env:SMMF_REDIS_PORT:-6390}", str(free_port()))
                           .replace("${env:SMMF_GATEWAY_PORT:-8000}", str(free_port()))
                           .replace('".smmf/redis"', f'"{work / "redis"}"')
                           + f"\n[flower]\nport = {flower_port}\n")
    config = load_config(config_path)
    with Stack(config, log_dir=work / "logs", flower=True):
        url = f"http://127.0.0.1:{flower_port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/healthcheck", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with Client(config) as client:
            for i in range(6):
                client.chat("tiny-noise-chat", [{"role": "user", "content": f"job {i}"}], max_tokens=8)
                client.embed("all-MiniLM-L6-v2", [f"text {i}", "another"])
        time.sleep(2)
        shoot(f"{url}/workers", ROOT / "docs" / "flower-workers.png")
        shoot(f"{url}/tasks", ROOT / "docs" / "flower-tasks.png")

if __name__ == "__main__":
    main()
