"""The README's number tables are what scripts/readme_tables.py makes of outputs/published/:
CI fails when a table and the records disagree, and the check does see a changed number."""

import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "readme_tables.py"


def check(readme):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_readme_tables_match_the_published_records(tmp_path):
    proc = check(ROOT / "README.md")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (ROOT / "README.md").read_text()
    for name in ("goals", "e2e", "serve_max_qps"):
        start = text.index(f"<!-- table:{name} -->")
        assert text.index(f"<!-- /table:{name} -->") - start > 200  # a table, not empty
    assert "no repeats" in text and "within 1 %" not in text
    # one number changed by hand: the check fails and shows the line
    edited = tmp_path / "README.md"
    edited.write_text(text.replace("| none | 700 / 700 qps |", "| none | 710 / 700 qps |"))
    proc = check(edited)
    assert proc.returncode == 1 and "+| none | 700 / 700 qps |" in proc.stderr
    # markers gone: one line, exit 2
    edited.write_text(text.replace("<!-- table:e2e -->", ""))
    proc = check(edited)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "table:e2e" in proc.stderr
