"""Model cards of pruned checkpoints: Hugging Face front matter, licence carried over, the command; no stale
GGUF name in config.json."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from tiny import data_dir, save_tiny

from simdiff.cli.main import main
from simdiff.store.card import write_model_card

CALIB = ["--samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2"]


def test_prune_card_has_front_matter_licence_and_command(tmp_path, monkeypatch):
    base = save_tiny("llama", tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny\n", encoding="utf-8")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_model_name_or_path": "Tiny Gguf Name"}))
    monkeypatch.chdir(tmp_path)  # a relative input path must still give a base_model that loads from anywhere
    assert main(["-q", "prune", "base", "--calib", "wikitext2", "--data-dir", str(data_dir()), *CALIB,
                 "--num-layers", "2", "--out", "pruned"]) == 0
    out = tmp_path / "pruned"
    card = ModelCard.load(out / "README.md")  # the hub's own parser
    meta = card.data.to_dict()
    assert meta["base_model"] == str(base.resolve())
    assert meta["library_name"] == "transformers" and meta["license"] == "mit"
    assert {"pruned", "depth-pruning", "simdiff"} <= set(meta["tags"])
    assert meta["datasets"] == ["Salesforce/wikitext"]
    record = json.loads((out / "simdiff.json").read_text())
    assert f"Removed layers (original numbering): {record['removed_layers']}" in card.text
    assert "Criterion: `simdiff`" in card.text and f"```bash\n{record['command']}\n```" in card.text
    assert "_model_name_or_path" not in json.loads((out / "config.json").read_text())


def test_builtin_card_names_its_hub_model_and_evaluation(tmp_path):
    evaluation = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.61, "acc_stderr,none": 0.03}}}
    metadata = {"base_model": "smollm2-135m", "removed_layers": [3, 7], "num_layers_before": 30,
                "num_layers_after": 28, "criterion": "simdiff", "calibration": {"source": "notes.txt"},
                "evaluation": evaluation, "command": "simdiff prune smollm2-135m --num-layers 2 --out x"}
    write_model_card(tmp_path, metadata)
    card = ModelCard.load(tmp_path / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "datasets" not in meta  # a local calibration file has no hub id
    (entry,) = meta["model-index"][0]["results"]
    assert entry["dataset"]["name"] == "piqa" and entry["metrics"] == [{"type": "acc", "value": 0.61}]
    assert "simdiff prune smollm2-135m --num-layers 2 --out x" in card.text and "Q4_1 GGUF" in card.text


def test_second_round_card_counts_in_the_original_numbering(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    common = ["--calib", "wikitext2", "--data-dir", str(data_dir()), *CALIB, "--num-layers", "1"]
    assert main(["-q", "prune", str(base), *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["-q", "prune", str(tmp_path / "one"), *common, "--out", str(tmp_path / "two")]) == 0
    card = ModelCard.load(tmp_path / "two" / "README.md")
    record = json.loads((tmp_path / "two" / "simdiff.json").read_text())
    assert card.data.to_dict()["base_model"] == str((tmp_path / "one").resolve())  # the direct input
    assert "with 2 of 6 decoder layers removed" in card.text and "- Layers: 6 → 4" in card.text
    assert f"Pruned in 2 rounds from `{base}`" in card.text
    assert f"Removed layers (original numbering): {record['removed_layers']}" in card.text
