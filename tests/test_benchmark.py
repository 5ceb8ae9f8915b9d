import json
import tempfile

from centermask_tf.cli import main


def test_data_benchmark_prints_and_records(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results = tmp_path / "results.json"
    args = [
        "benchmark", "data", "--config", "configs/shapes_tiny.yaml", "--runs", "2", "--batches", "2",
        "--results", str(results), "--set", "train.batch_size=4",
    ]
    assert main(args) == 0
    assert "images_per_s" in capsys.readouterr().out
    (record,) = json.loads(results.read_text())
    assert record["benchmark"] == "data" and record["machine"]["cores"] >= 1
    row = record["rows"][0]
    assert row["input_size"] == 128 and len(row["runs"]) == 2 and row["images_per_s"] > 0
