"""``cdlab.shutdown.exit``: how every cdlab command ends (``python -m cdlab.ui.bench exit`` measures how fast)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from cdlab.paths import REPO_ROOT

# A command's end, with an atexit handler that records how many objects the collector had frozen by then.
CHILD = textwrap.dedent("""
    import atexit, gc, sys
    from cdlab import shutdown

    def report():
        with open(sys.argv[1], "w") as f:
            f.write(f"{gc.get_freeze_count()}")

    atexit.register(report)
    shutdown.exit(int(sys.argv[2]))
""")


def test_the_exit_status_and_atexit_handlers_are_kept_and_the_heap_is_frozen(tmp_path):
    report = tmp_path / "report.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for code in (0, 3):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(report), str(code)], env=env,
                              cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr == ""  # nothing "ignored" at teardown
        assert int(report.read_text()) > 1000  # the atexit handler ran, after gc.freeze took the whole heap
        report.unlink()


def test_every_command_ends_by_shutdown_exit():
    """Each ``if __name__ == "__main__":`` of the app and the package ends the one way (the module says why)."""
    blocks = {}
    for path in [REPO_ROOT / "app.py", *sorted((REPO_ROOT / "cdlab").rglob("*.py"))]:
        parts = re.split(r'^if __name__ == "__main__":$', path.read_text(encoding="utf-8"), flags=re.M)
        if len(parts) > 1:
            blocks[path.relative_to(REPO_ROOT).as_posix()] = parts[-1].strip()
    assert "app.py" in blocks and "cdlab/__main__.py" in blocks and "cdlab/flow/distill.py" in blocks
    assert {k: v for k, v in blocks.items() if v != "from cdlab import shutdown\n\n    shutdown.exit(main())"} == {}
