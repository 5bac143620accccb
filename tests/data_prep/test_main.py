"""python -m data_prep: the command line of sr_tf.conversion, its exit codes and summary."""

import json
import os
import subprocess
import sys

from tests import ROOT


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_exit_codes_and_console_summary(testdata, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"nonsense")
    ok = _cli(f"--input={testdata('CT_small.dcm')},{bad}", f"--output={tmp_path / 'ok'}", "--noprogress")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 1 records" in ok.stdout and "bad.dcm" in ok.stdout and "1 input(s) failed" in ok.stdout
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["failed"][0]["input"].endswith("bad.dcm")
    # A repeated --input adds to the list (it does not replace the earlier ones).
    both = _cli(f"--input={testdata('CT_small.dcm')}", f"--input={testdata('MR_small.dcm')}",
                f"--output={tmp_path / 'both'}", "--noprogress")
    assert both.returncode == 0, both.stderr
    assert sum(json.loads((tmp_path / "both" / "manifest.json").read_text())["counts"].values()) == 2
    none = _cli(f"--input={bad}", f"--output={tmp_path / 'none'}", "--noprogress")
    assert none.returncode != 0
    assert "no image could be converted" in none.stderr and "bad.dcm" in none.stderr
