"""The rules the layout promises, checked on the imports themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smmf_queue"


def test_the_gateway_and_the_sdk_load_no_provider_beyond_the_table() -> None:
    code = ("import sys, smmf_queue.gateway, smmf_queue.client; "
            "print(sorted(m for m in sys.modules if m.startswith('smmf_queue.providers')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "['smmf_queue.providers']"


def test_providers_know_no_queue_and_no_stream() -> None:
    forbidden = {"streaming", "queues", "attempt", "client", "hub", "worker", "gateway", "lua", "celery_ext"}
    for path in sorted((PACKAGE / "providers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                imported = (node.module or "").split(".")[0]
                assert imported not in forbidden, f"{path.name} imports {imported}"
