"""The golden loss curve: a tiny fixed-seed CPU run through lit_gpt.trainer.fit must reproduce the losses in
tests/golden/loss_tiny.json to 1e-5 (why 1e-5: tests/golden/README.md). A change that is meant to move training
regenerates the file on purpose: python tests/golden_loss.py --regenerate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_loss  # noqa: E402


def test_golden_loss_curve(tmp_path):
    stored = json.loads(golden_loss.GOLDEN.read_text())
    assert stored["config"] == golden_loss.CONFIG and stored["abs_tolerance"] == golden_loss.ABS_TOL, (
        f"tests/golden_loss.py's CONFIG or ABS_TOL changed but {golden_loss.GOLDEN.name} was not regenerated; run "
        f"`{golden_loss.REGENERATE}` and commit the file")
    assert len(stored["train_loss"]) == golden_loss.STEPS
    got = golden_loss.run_golden(tmp_path)
    problems = golden_loss.compare(stored, got)
    assert not problems, golden_loss.failure_message(stored, problems)


def test_compare_reports_every_moved_loss_and_how_to_regenerate():
    stored = {"train_loss": [5.0, 4.0, 3.0], "val_loss": 3.5, "environment": {"torch": "x"}}
    assert golden_loss.compare(stored, {"train_loss": [5.0, 4.0 + 9e-6, 3.0], "val_loss": 3.5}) == []
    problems = golden_loss.compare(stored, {"train_loss": [5.0, 4.0 + 2e-5, float("nan")], "val_loss": 3.6})
    assert [p.split(":")[0] for p in problems] == ["train_loss step 2", "train_loss step 3", "val_loss after step 3"]
    assert golden_loss.compare(stored, {"train_loss": [5.0], "val_loss": 3.5})[0] == \
        "1 steps ran, the golden file has 3"
    msg = golden_loss.failure_message(stored, problems)
    assert "python tests/golden_loss.py --regenerate" in msg and "tests/golden/loss_tiny.json" in msg
