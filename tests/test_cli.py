"""The main job runs end to end as a user would start it."""

import subprocess
import sys


def test_vqt_demo_verifies_every_step():
    res = subprocess.run([sys.executable, "-m", "vqt", "demo"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "every step matched the dense forward" in res.stdout
    assert res.stdout.count(" yes\n") == 8
