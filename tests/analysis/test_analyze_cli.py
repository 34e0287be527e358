"""``attnkit analyze`` on SmolLM2: the report, its JSON and its pictures."""

import json

from click.testing import CliRunner

from attnkit.cli import main


def test_analyze_induction_writes_report_json_and_pictures(smollm2, tmp_path):
    res = CliRunner().invoke(main, ["analyze", "--task", "induction", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "report.md").read_text()
    assert "## Induction" in report and "Top heads" in report
    data = json.loads((tmp_path / "analysis.json").read_text())
    abl = data["ablation"]
    # the top induction heads matter more to the repeated half than as many random heads
    assert abl["loss_top_ablated"] > abl["loss_random_ablated"]
    for name in ("induction", "previous_token"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert len(json.loads((tmp_path / f"{name}.json").read_text())["values"]) == 30


def test_analyze_refuses_a_causal_task_on_an_encoder(tmp_path):
    res = CliRunner().invoke(main, ["analyze", "--model", "minilm", "--task", "ioi", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "encoder" in str(res.exception)
