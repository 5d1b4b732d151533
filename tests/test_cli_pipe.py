"""A command whose output is cut short by its reader (``python -m pipeline.compare | head``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_closed_pipe_ends_quietly():
    code = ("import sys\nfrom pipeline.errors import cli_entry\n"
            "def main(argv):\n    for i in range(200000):\n        print('row', i)\n"
            "sys.exit(cli_entry(main, []))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()  # the reader stops, as head does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
