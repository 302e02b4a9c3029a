"""The simulator is a lower layer: it never pulls in web code, the server, client or CLI."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ["fastapi", "httpx", "uvicorn", "fedlearn.server", "fedlearn.client", "fedlearn.cli"]


def test_sim_imports_no_web_server_client_or_cli_code() -> None:
    code = (
        "import sys, fedlearn.sim\n"
        f"print(','.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", f"fedlearn.sim imports {out.stdout.strip()}"
