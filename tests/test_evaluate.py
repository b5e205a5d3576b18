"""Perplexity protocol, lm-eval tasks on local PIQA, % retained, and the `simdiff eval` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import data_dir, save_tiny, tiny_model, tiny_tokenizer

from simdiff.cli.main import main
from simdiff.data import bos_token_id, load_text, tokenize_text
from simdiff.evaluate.perplexity import PerplexityProtocol, evaluate_perplexity
from simdiff.evaluate.suite import mean_accuracy, percent_retained


def _bos_tokenizer():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@torch.no_grad()
def _reference_nll(model, ids: list[int], seq_len: int, bos: int | None, max_tokens: int) -> tuple[float, int]:
    """A straightforward loop: one window at a time, float64 log-softmax, summed over predicted tokens."""
    body = seq_len - (bos is not None)
    ids = ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids) - body + 1, body):
        window = ([bos] if bos is not None else []) + ids[start : start + body]
        logits = model(torch.tensor([window])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(window[1:])
        total -= float(logp[torch.arange(len(targets)), targets].sum())
        count += len(targets)
    return total, count


@pytest.mark.parametrize("with_bos", [False, True])
def test_perplexity_matches_reference_loop(with_bos, tmp_path):
    model, tok = tiny_model("llama"), _bos_tokenizer() if with_bos else tiny_tokenizer()
    bos = bos_token_id(tok)
    assert (bos is not None) == with_bos
    text = tmp_path / "slice.txt"  # a slice of the test split keeps tokenisation fast
    text.write_text(load_text("wikitext2", "test", data_dir())[:6000], encoding="utf-8")
    protocol = PerplexityProtocol(str(text), "test", seq_len=48, max_tokens=700, batch_size=3)
    report = evaluate_perplexity(model, tok, protocol)
    ids = tokenize_text(tok, text.read_text(encoding="utf-8")).tolist()
    total, count = _reference_nll(model, ids, 48, bos, 700)
    body = 48 - with_bos
    assert report["windows"] == 700 // body
    assert report["tokens"] == count == (700 // body) * 47
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert report["protocol"]["bos_per_window"] is with_bos and report["protocol"]["max_tokens"] == 700


def test_piqa_rows_join_labels():
    from simdiff.evaluate.tasks.piqa_local.utils import piqa_rows

    rows = piqa_rows(data_dir() / "piqa")
    labels = (data_dir() / "piqa" / "valid-labels.lst").read_text().split()
    assert len(rows) == len(labels) > 1000
    assert [r["label"] for r in rows[:50]] == [int(x) for x in labels[:50]]
    assert {r["label"] for r in rows} == {0, 1}


@torch.no_grad()
def _reference_piqa(model, tok, rows: list[dict]) -> tuple[float, float]:
    """acc and acc_norm by hand, with lm-eval's multiple-choice rules: context "Question: {goal}\nAnswer:",
    continuation " {sol}" (tokens of context+continuation after the context's), summed log-likelihood;
    acc_norm divides it by the continuation's length in bytes."""
    acc, acc_norm = 0, 0
    for row in rows:
        context = f"Question: {row['goal']}\nAnswer:"
        scores, norms = [], []
        for sol in (row["sol1"], row["sol2"]):
            ctx = tok(context, add_special_tokens=False).input_ids
            whole = tok(context + " " + sol, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            ll = sum(float(logp[len(whole) - len(cont) - 1 + k, t]) for k, t in enumerate(cont))
            scores.append(ll)
            norms.append(ll / len((" " + sol).encode("utf-8")))
        acc += int(np.argmax(scores)) == row["label"]
        acc_norm += int(np.argmax(norms)) == row["label"]
    return acc / len(rows), acc_norm / len(rows)


def test_lm_eval_local_piqa_matches_a_hand_computed_accuracy(monkeypatch):
    from simdiff.evaluate.harness import TaskRunner, local_task_names
    from simdiff.evaluate.tasks.piqa_local.utils import piqa_rows
    from simdiff.model.layers import bypass_layers

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_task_names(["piqa", "hellaswag"], str(data_dir())) == {"piqa": "piqa_local", "hellaswag": "hellaswag"}
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = piqa_rows(data_dir() / "piqa")[:12]
    runner = TaskRunner(model, tok, ["piqa"], limit=12, batch_size=4, data_dir=str(data_dir()), max_length=1024)
    dense = runner()["piqa"]
    assert dense["lm_eval_task"] == "piqa_local" and dense["samples"] == 12
    assert (dense["acc"], dense["acc_norm"]) == pytest.approx(_reference_piqa(model, tok, rows))
    with bypass_layers(model, [0, 1, 2, 3, 4]):  # the same runner sees the bypassed model
        assert runner()["piqa"]["acc"] == pytest.approx(_reference_piqa(model, tok, rows)[0])


def test_unknown_task_is_a_user_error():
    from simdiff.core.errors import SimdiffError
    from simdiff.evaluate.harness import TaskRunner

    with pytest.raises(SimdiffError, match="piqaa"):
        TaskRunner(tiny_model("llama"), tiny_tokenizer(), ["piqaa"], limit=2, data_dir=str(data_dir()))


def test_percent_retained_and_ppl_ratio():
    dense = {"perplexity": {"wikitext2": {"perplexity": 10.0}},
             "tasks": {"piqa": {"acc": 0.8, "acc_norm": 0.5}, "boolq": {"acc": 0.6}}}
    pruned = {"perplexity": {"wikitext2": {"perplexity": 15.0}},
              "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.5}, "boolq": {"acc": 0.6}}}
    kept = percent_retained(dense, pruned)
    assert kept["tasks"]["piqa"]["acc"] == pytest.approx(75.0)
    assert kept["tasks"]["boolq"]["acc"] == pytest.approx(100.0)
    assert kept["average"]["acc"] == pytest.approx(100 * 0.6 / 0.7)  # mean over mean, as papers report
    assert kept["average"]["acc_norm"] == pytest.approx(100.0)
    assert kept["ppl_ratio"]["wikitext2"] == pytest.approx(1.5)
    assert mean_accuracy(pruned) == pytest.approx(0.6)


def test_eval_command_writes_json_with_baseline(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "eval.json"
    code = main(["-q", "eval", str(folder), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "400",
                 "--eval-batch-size", "4", "--baseline", str(folder), "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    report = doc["simdiff"]["perplexity"]["wikitext2"]
    assert report["tokens"] == (400 // 32) * 31 and math.isfinite(report["perplexity"])
    assert doc["results"]["wikitext2"]["token_perplexity,none"] == report["perplexity"]
    assert doc["simdiff"]["retained"]["ppl_ratio"]["wikitext2"] == pytest.approx(1.0)
    assert "versions" in doc["simdiff"] and "command" in doc["simdiff"]
    printed = capsys.readouterr().out
    assert "wikitext2: perplexity" in printed
    assert f"baseline {folder} wikitext2: perplexity" in printed  # the dense figures are printed too


def _reference_lm_eval_output(tmp_path) -> dict:
    """lm-eval's own simple_evaluate output and EvaluationTracker file for a tiny model on local PIQA."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    from simdiff.evaluate.harness import task_manager

    lm = HFLM(pretrained=tiny_model("llama"), tokenizer=tiny_tokenizer(), batch_size=4, max_length=128)
    out = lm_eval.simple_evaluate(model=lm, tasks=["piqa_local"], limit=4, task_manager=task_manager(str(data_dir())),
                                  log_samples=True)
    samples = out.pop("samples")
    EvaluationTracker(output_path=str(tmp_path / "ref.json")).save_results_aggregated(results=out, samples=samples)
    return json.loads(next(tmp_path.glob("ref_*.json")).read_text())


def test_eval_json_has_lm_eval_schema_and_reads_with_lm_eval(tmp_path, monkeypatch, capfd):
    from lm_eval.utils import make_table

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # outside any git checkout, where lm-eval's `git describe` fails
    folder = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", str(folder), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "400",
                 "--tasks", "piqa", "--limit", "4", "--task-max-length", "128", "--data-dir", str(data_dir()),
                 "--json", str(out), "--log-samples", "--num-fewshot", "1"]) == 0
    assert "not a git repository" not in capfd.readouterr().err
    doc = json.loads(out.read_text())
    reference = _reference_lm_eval_output(tmp_path)
    # every top-level key lm-eval writes is there, and every per-task table has the same inner keys
    assert set(reference) <= set(doc)
    ref_task, ref_entry = next(iter(reference["results"].items()))
    assert set(ref_entry) == set(doc["results"]["piqa"])
    for key in ("configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert type(doc[key]["piqa"]) is type(reference[key][ref_task])
        if isinstance(reference[key][ref_task], dict) and key != "configs":
            assert set(reference[key][ref_task]) <= set(doc[key]["piqa"])
    assert set(reference["config"]) <= set(doc["config"])
    assert doc["config"]["model"] == str(folder) and doc["n-samples"]["piqa"]["effective"] == 4
    assert doc["n-shot"]["piqa"] == 1 and doc["configs"]["piqa"]["num_fewshot"] == 1  # passed through
    assert 0 < doc["results"]["piqa"]["acc_stderr,none"] < 1
    # the same perplexity keys as a task: value, stderr, alias; and a config, version, n-shot like a task
    ppl = doc["results"]["wikitext2"]
    assert ppl["alias"] == "wikitext2" and ppl["token_perplexity_stderr,none"] > 0
    assert doc["higher_is_better"]["wikitext2"] == {"token_perplexity": False}
    # lm-eval's own table reader reads it: one row per metric with its stderr
    table = make_table(doc)
    assert "piqa" in table and "wikitext2" in table and "token_perplexity" in table
    assert f"{doc['results']['piqa']['acc_stderr,none']:.4f}" in table
    assert f"{ppl['token_perplexity_stderr,none']:.4f}" in table
    # per-question records beside the results, named as lm-eval names them, one line per question
    samples = list(tmp_path.glob("samples_piqa_*.jsonl"))
    assert len(samples) == 1
    lines = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(lines) == 4 and {"doc", "resps", "acc"} <= set(lines[0])


def _eval_json(tmp_path, folder, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["-q", "eval", str(folder), "--ppl", "wikitext2", "--eval-seq-len", "32", "--eval-batch-size", "4",
                 "--json", str(out), *extra]) == 0
    return out


def test_baseline_of_another_protocol_is_refused_unless_allowed(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "tiny")
    dense = _eval_json(tmp_path, folder, "dense.json", "--max-tokens", "400")
    capsys.readouterr()
    args = ["-q", "eval", str(folder), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "200",
            "--baseline", str(dense)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-tokens: baseline 400, this run 200" in err
    assert "--allow-protocol-mismatch" in err
    assert main([*args, "--allow-protocol-mismatch"]) == 0
    assert "perplexity ratio vs baseline" in capsys.readouterr().out
    # same settings: accepted, and the baseline's figures are printed
    assert main([*args[:-3], "400", "--baseline", str(dense)]) == 0
    assert "baseline" in capsys.readouterr().out


def test_baseline_with_other_tokens_is_refused_after_evaluating(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "tiny")
    dense = _eval_json(tmp_path, folder, "dense.json", "--max-tokens", "400")
    doc = json.loads(dense.read_text())
    doc["simdiff"]["perplexity"]["wikitext2"]["tokens"] += 31  # as if the text had been longer
    dense.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["-q", "eval", str(folder), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "400",
                 "--baseline", str(dense)]) == 2
    assert "perplexity tokens of wikitext2: baseline 403, this run 372" in capsys.readouterr().err


def test_eval_command_with_a_baseline_json_file(tmp_path, capsys):
    dense, pruned = save_tiny("llama", tmp_path / "dense"), tmp_path / "pruned"
    tiny_model("llama", 4, seed=1).save_pretrained(pruned)
    tiny_tokenizer().save_pretrained(pruned)
    common = ["--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "400", "--eval-batch-size", "4"]
    assert main(["-q", "eval", str(dense), *common, "--json", str(tmp_path / "dense.json")]) == 0
    dense_doc = json.loads((tmp_path / "dense.json").read_text())
    report = dense_doc["simdiff"]["perplexity"]["wikitext2"]
    assert report["tokens"] == (400 // 32) * 31 and math.isfinite(report["perplexity"])
    assert report["protocol"]["text"].startswith("wikitext-2-raw-v1/test")
    assert len(report["window_nll"]) == 400 // 32 and report["perplexity_stderr"] > 0
    assert "versions" in dense_doc["simdiff"] and "command" in dense_doc["simdiff"]
    capsys.readouterr()
    # the FILE.json branch: the baseline is read, not re-evaluated (a second load would be the other model)
    assert main(["-q", "eval", str(pruned), *common, "--baseline", str(tmp_path / "dense.json"),
                 "--json", str(tmp_path / "pruned.json")]) == 0
    doc = json.loads((tmp_path / "pruned.json").read_text())
    ratio = doc["simdiff"]["perplexity"]["wikitext2"]["perplexity"] / report["perplexity"]
    assert doc["simdiff"]["baseline"]["perplexity"] == dense_doc["simdiff"]["perplexity"]
    assert doc["simdiff"]["retained"]["ppl_ratio"]["wikitext2"] == pytest.approx(ratio) and abs(ratio - 1) > 1e-3
    assert "perplexity ratio vs baseline" in capsys.readouterr().out


def test_eval_command_rejects_nothing_to_do(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "tiny")
    assert main(["-q", "eval", str(folder), "--ppl", ""]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["-q", "eval", str(folder), "--tasks", "piqa", "--log-samples"]) == 2
    err = capsys.readouterr().err
    assert "--log-samples" in err and "--json FILE" in err


def test_demo_says_when_two_perplexities_are_within_noise():
    from simdiff.cli.evaluate import noise_note

    def row(label, removed, nll):
        return {"label": label, "removed_layers": removed, "perplexity": {"t": {"window_nll": nll}}}

    base = [3.0, 3.4, 2.9, 3.8, 3.1, 3.3]
    close = row("b", [2], [v + d for v, d in zip(base, [0.05, -0.04, 0.03, -0.05, 0.02, -0.01])])
    far = row("b", [2], [v + 0.3 for v in base])
    assert "within noise" in noise_note(row("a", [1], base), close, "t")
    note = noise_note(row("a", [1], base), far, "t")
    assert "a is better beyond 2 standard errors" in note and "-0.3000" in note
    assert noise_note(row("a", [1], base), row("b", [1], base), "t") == "the same layers"


def test_log_samples_go_through_the_output_contract(tmp_path, monkeypatch, capfd):
    """Issue 15 item 3: lm-eval wrote samples_*.jsonl in place, replacing a file of that name without --overwrite."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # outside any git checkout, where lm-eval's `git describe` fails
    monkeypatch.setattr("simdiff.evaluate.results.samples_date", lambda: "2026-12-04T18-00-00")
    folder = save_tiny("llama", tmp_path / "tiny")
    results = tmp_path / "results"
    results.mkdir()
    mine = results / "samples_piqa_2026-12-04T18-00-00.jsonl"
    mine.write_text("the user's records\n")
    args = ["-q", "eval", str(folder), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "200", "--tasks",
            "piqa", "--limit", "2", "--task-max-length", "128", "--data-dir",
            str(data_dir()), "--json", str(results / "eval.json"), "--log-samples"]
    assert main(args) == 3
    err = capfd.readouterr().err
    assert f"saved {str(results / 'eval.json')!r} (the results, complete), but NOT written: the --log-samples" in err
    assert "already exists" in err and "Traceback" not in err
    assert mine.read_text() == "the user's records\n" and json.loads((results / "eval.json").read_text())["results"]
    assert sorted(p.name for p in results.iterdir()) == ["eval.json", mine.name]  # no temporary entry left
    assert main([*args, "--overwrite"]) == 0
    assert len(mine.read_text().splitlines()) == 2
