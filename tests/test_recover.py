"""Recovery: LoRA training on tiny models (loss, merge, resume, save/reload, CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import data_dir, save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from simdiff.cli.main import main
from simdiff.core.errors import SimdiffError
from simdiff.recover import RecoverConfig, attach_lora, merge, train_lora
from simdiff.recover.data import training_text

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "



@pytest.fixture
def repeated_text(tmp_path):
    path = tmp_path / "repeated.txt"
    path.write_text(SENTENCE * 200, encoding="utf-8")
    return path


def small_config(data, **overrides) -> RecoverConfig:
    settings = {"data": str(data), "steps": 8, "batch_size": 2, "seq_len": 32, "lr": 1e-2, "warmup_steps": 2,
                "heldout_windows": 2, "eval_every": 4, "checkpoint_every": 0, "dropout": 0.0, "seed": 0}
    return RecoverConfig(**{**settings, **overrides})


def tiny_lora(config: RecoverConfig):
    model = tiny_model("llama")
    return attach_lora(model, config), tiny_tokenizer()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def test_loss_decreases_on_repeated_text(repeated_text):
    # LoRA on the LM head too: a random tiny model's head is too weak to fit anything through the body alone.
    config = small_config(repeated_text, lr=1e-2, steps=16, target_modules=ALL_PROJECTIONS + ",lm_head")
    model, tok = tiny_lora(config)
    result = train_lora(model, training_text(tok, config.data, config.seq_len, config.heldout_windows), config)
    losses = [row["loss"] for row in result.history["train"]]
    assert len(losses) == config.steps
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.85 * losses[0]
    assert losses[-1] < math.log(256) - 0.5  # better than a uniform guess: it learnt the text
    heldout = [row["loss"] for row in result.history["heldout"]]
    assert [row["step"] for row in result.history["heldout"]] == [0, 4, 8, 12, 16]  # 0: before training
    assert heldout[-1] < heldout[0]
    lrs = [row["lr"] for row in result.history["train"]]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up, then decay


def test_merge_equals_adapter_and_differs_from_base(repeated_text):
    config = small_config(repeated_text, steps=4, eval_every=0)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    base_logits = logits(tiny_model("llama"), ids)
    model, tok = tiny_lora(config)
    train_lora(model, training_text(tok, config.data, config.seq_len, config.heldout_windows), config)
    adapter_logits = logits(model, ids)
    merged = merge(model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits = logits(merged, ids)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # negative control: training changed the model


def test_resume_continues_at_saved_step_with_same_loss(repeated_text, tmp_path):
    config = small_config(repeated_text, steps=6, checkpoint_every=3, keep_checkpoints=0, dropout=0.1,
                          eval_every=3)
    model, tok = tiny_lora(config)
    text = training_text(tok, config.data, config.seq_len, config.heldout_windows)
    full = train_lora(model, text, config, checkpoint_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-0000003", "step-0000006"]
    fresh, _ = tiny_lora(config)
    resumed = train_lora(fresh, text, config, resume=tmp_path / "ckpt" / "step-0000003")
    assert resumed.start_step == 3
    assert [r["step"] for r in resumed.history["train"]] == list(range(1, 7))
    expected = [r["loss"] for r in full.history["train"]]
    got = [r["loss"] for r in resumed.history["train"]]
    assert got == pytest.approx(expected, rel=1e-5)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(resumed.model, ids), logits(full.model, ids), atol=1e-5, rtol=1e-5)


def test_resume_with_different_settings_is_refused(repeated_text, tmp_path):
    config = small_config(repeated_text, steps=2, checkpoint_every=2, eval_every=0)
    model, tok = tiny_lora(config)
    text = training_text(tok, config.data, config.seq_len, config.heldout_windows)
    train_lora(model, text, config, checkpoint_dir=tmp_path)
    other = small_config(repeated_text, steps=4, eval_every=0, lr=1e-3)
    fresh, _ = tiny_lora(other)
    with pytest.raises(SimdiffError, match="lr"):
        train_lora(fresh, text, other, resume=tmp_path / "step-0000002")


def test_step_order_is_a_pure_function_of_step(repeated_text):
    text = training_text(tiny_tokenizer(), str(repeated_text), 32, 2)
    n = len(text.train)
    first_epoch = torch.cat([text.step_indices(s, 3, seed=0) for s in range(n // 3)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no window repeats within an epoch
    assert torch.equal(text.step_indices(5, 3, seed=0), text.step_indices(5, 3, seed=0))
    assert not torch.equal(text.step_indices(0, 6, seed=0), text.step_indices(0, 6, seed=1))


def test_cli_recover_saves_a_vanilla_checkpoint(tmp_path, repeated_text, capsys):
    from huggingface_hub import ModelCard

    pruned = save_tiny("llama", tmp_path / "pruned")
    (pruned / "simdiff.json").write_text(json.dumps({"removed_layers": [3], "criterion": "simdiff"}))
    out = tmp_path / "recovered"
    code = main(["-q", "recover", str(pruned), "--out", str(out), "--data", str(repeated_text), "--steps", "4",
                 "--train-batch-size", "2", "--train-seq-len", "32", "--lr", "5e-3", "--eval-every", "2",
                 "--checkpoint-every", "2", "--heldout-windows", "2", "--max-tokens", "256"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    meta = json.loads((out / "simdiff.json").read_text())
    assert meta["removed_layers"] == [3]  # the pruning record is kept
    rec = meta["recovery"]
    assert [r["step"] for r in rec["loss_curve"]] == [1, 2, 3, 4]
    assert [r["step"] for r in rec["heldout_curve"]] == [0, 2, 4]
    assert rec["settings"]["rank"] == 8 and rec["merged"] is True
    assert 0 < rec["trainable_parameters"] < rec["total_parameters"]
    ppl = rec["perplexity"]
    assert ppl["dataset"] == "wikitext2 test" and 0 < ppl["tokens"] <= 256
    assert math.isfinite(ppl["before"]) and math.isfinite(ppl["after"]) and ppl["before"] != ppl["after"]
    assert "versions" in rec and "command" in rec
    assert (out / "recovery_loss.png").stat().st_size > 1000
    card = ModelCard.load(out / "README.md")
    (measured,) = card.data.to_dict()["model-index"][0]["results"]
    assert measured["metrics"][0] == {"type": "perplexity", "name": "token perplexity after recovery",
                                      "value": round(ppl["after"], 4)}
    assert card.data.to_dict()["base_model"] == str(pruned.resolve()) and "## Recovery" in card.text
    assert (tmp_path / "recovered.checkpoints" / "step-0000004").is_dir()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(pruned)
    assert not any("lora" in name for name in reloaded.state_dict())
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    assert (logits(reloaded, ids) - logits(original, ids)).abs().max() > 1e-3
    assert not list(tmp_path.glob(".recovered*"))  # no staging leftovers


def test_cli_no_merge_saves_a_loadable_adapter(tmp_path, repeated_text, monkeypatch):
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM, PeftModel

    base = save_tiny("llama", tmp_path / "base")
    out = tmp_path / "adapter"
    monkeypatch.chdir(tmp_path)  # the base given as a relative path
    code = main(["-q", "recover", "base", "--out", str(out), "--data", str(repeated_text), "--steps", "2",
                 "--train-batch-size", "2", "--train-seq-len", "32", "--eval-every", "0", "--checkpoint-every", "0",
                 "--max-tokens", "128", "--no-merge", "--target-modules", "q_proj,v_proj"])
    assert code == 0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "simdiff.json").read_text())["recovery"]["merged"] is False
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    names = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    # the adapter names its base by absolute path, so it loads from any working directory
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    monkeypatch.chdir(out)
    ids = torch.arange(3, 13).unsqueeze(0)
    assert torch.equal(logits(AutoPeftModelForCausalLM.from_pretrained(out), ids), logits(model, ids))
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["base_model"] == str(base.resolve())
    assert "lora" in meta["tags"] and "More Information Needed" not in card.text  # not peft's empty template
    assert "## Recovery" in card.text and "PeftModel.from_pretrained" in card.text


@pytest.mark.parametrize("extra, message", [
    (["--target-modules", "no_such_proj"], "no_such_proj"),
    (["--steps", "0"], "--steps"),
    (["--resume"], "no checkpoint"),
    (["--data", str(data_dir() / "wikitext-2" / "test.txt")], "test split"),
])
def test_cli_user_errors_exit_2(tmp_path, repeated_text, capsys, extra, message):
    base = save_tiny("llama", tmp_path / "base")
    code = main(["-q", "recover", str(base), "--out", str(tmp_path / "out"), "--data", str(repeated_text),
                 "--train-seq-len", "32", "--max-tokens", "128", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_output(tmp_path, repeated_text, capsys):
    (tmp_path / "out").mkdir()
    code = main(["-q", "recover", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays():
    from simdiff.recover.train import lr_factor

    factors = [lr_factor(s, warmup=2, total=10) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:])) and 0 < factors[-1] < 0.1
    assert lr_factor(0, warmup=0, total=10) == 1.0


def test_grad_accum_matches_the_larger_batch(repeated_text):
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    runs = []
    for batch_size, accum in ((4, 1), (2, 2)):
        config = small_config(repeated_text, steps=2, batch_size=batch_size, grad_accum=accum, eval_every=0)
        model, tok = tiny_lora(config)
        result = train_lora(model, training_text(tok, config.data, config.seq_len, config.heldout_windows), config)
        runs.append(([r["loss"] for r in result.history["train"]], logits(result.model, ids)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=1e-4)
