"""The README's first command, end to end (slow: ~9 minutes on 2 cores)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_draws_the_digits_it_is_asked_for(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdray.cli", "demo", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("digit_accuracy=")
    assert float(last.split("=")[1]) >= 0.95, result.stdout[-2000:]
    assert (tmp_path / "digits-grid.png").exists() and (tmp_path / "unet" / "loss.png").exists()
