import subprocess
import sys

from zotune import cli


def test_demo_runs_and_reports(capsys):
    assert cli.main(["demo", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "after 20 MeZO steps" in out


def test_bad_steps_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "zotune", "demo", "--steps", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "zotune: error: --steps must be > 0"


def test_version():
    result = subprocess.run([sys.executable, "-m", "zotune", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("zotune ")
