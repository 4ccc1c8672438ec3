"""Hostile-client figures for ``internvl-u serve``: ``python bench/hostile.py`` (tiny checkpoint, 127.0.0.1).

For each attack: the status code, the seconds until the answer, and how much the server's peak
resident memory (VmHWM) grew. The image bombs are the issue's: a 1-bit 12000×12000 PNG sent as a
data URI (17 KiB), and a 16-bit grey 12000×12000 PNG upload (decoded, it would take about 4 GB on
the old path). Prints a Markdown table and writes ``bench/results/hostile-<timestamp>.json``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serving import ServerProcess  # noqa: E402
from test_serve_hostile import _png, rss_peak_kib  # noqa: E402


def attacks() -> list[tuple[str, dict]]:
    bomb = _png(12000, 12000, 1, 0)
    sixteen = _png(12000, 12000, 16, 0)
    uri = "data:image/png;base64," + base64.b64encode(bomb).decode()
    json_type = {"Content-Type": "application/json"}
    return [
        (f"1-bit 12000² PNG data URI ({len(bomb) / 1024:.0f} KiB)", dict(url="/v1/chat/completions", json={
            "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]})),
        (f"16-bit 12000² PNG upload ({len(sixteen) / 2**20:.2f} MiB)", dict(
            url="/v1/images/edits", data={"prompt": "x"}, files={"image": ("b.png", sixteen, "image/png")})),
        ("JSON nested 100,000 deep", dict(url="/v1/images/generations", headers=json_type,
                                          content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        ("5,000-digit integer seed", dict(url="/v1/images/generations", headers=json_type,
                                          content=b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}")),
        ("flow_shift 1e30", dict(url="/v1/images/generations", json={"prompt": "x", "flow_shift": 1e30})),
        ("JSON as text/plain", dict(url="/v1/images/generations", headers={"Content-Type": "text/plain"},
                                    content=json.dumps({"prompt": "x"}))),
    ]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        server = ServerProcess(Path(folder) / "server.log").start()
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for name, request in attacks():
                    before = rss_peak_kib(server.pid)
                    started = time.perf_counter()
                    answer = client.post(**request)
                    seconds = time.perf_counter() - started
                    error = answer.json().get("error", {})
                    rows.append({"attack": name, "status": answer.status_code, "param": error.get("param"),
                                 "seconds": round(seconds, 3),
                                 "rss_peak_growth_mib": round((rss_peak_kib(server.pid) - before) / 1024, 1)})
        finally:
            server.stop()
    print("| attack | status | param | seconds | peak RSS growth (MiB) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['attack']} | {row['status']} | {row['param']} | {row['seconds']} | {row['rss_peak_growth_mib']} |")
    out = ROOT / "bench" / "results" / f"hostile-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
