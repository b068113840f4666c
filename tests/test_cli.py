"""The root CLI: instant help with every plugin's commands, and no heavy imports on the way."""

from __future__ import annotations

import subprocess
import sys

EXPECTED = {"backfill", "search", "evaluate", "finetune", "tag", "worker", "enqueue", "watch", "dead-letters",
            "status"}


def test_help_lists_every_command_without_importing_heavy_libraries() -> None:
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from search.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\n"
            "print(r.output)\n"
            "heavy = sorted(m for m in ('torch', 'sentence_transformers', 'qdrant_client', 'qdrant_edge', 'celery',"
            " 'onnxruntime', 'pydantic_settings') if m in sys.modules)\n"
            "print('HEAVY:' + ','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert listed >= EXPECTED
    assert out.strip().endswith("HEAVY:")  # nothing heavy was imported
