"""bench.datasets' quality metrics and bench.e2e's bookkeeping, on tiny models."""

import json

import pytest

from bench import e2e
from bench.datasets import gsm8k_answer, gsm8k_tasks, humaneval_tasks, mmlu_tasks, score_humaneval, score_mmlu
from se_engine.gamma import MAX_GAMMA, ForwardCost, cycle_rate


def test_humaneval_runs_the_tests():
    task = humaneval_tasks(1)[0]  # has_close_elements
    good = ("    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
            "            if abs(a - b) < threshold:\n                return True\n    return False\n")
    assert score_humaneval(task, good)
    assert score_humaneval(task, good + "\ndef unrelated(:\n")  # cut at the next top-level statement
    assert not score_humaneval(task, "    return True\n")
    assert not score_humaneval(task, "    while True:\n        pass\n", timeout_s=2)


def test_gsm8k_prompt_and_answers():
    task = gsm8k_tasks(1)[0]
    assert "{{question}}" not in task.prompt and task.prompt.endswith("Answer: Let's think step by step.\n")
    assert "Janet" in task.prompt.split("Question:")[-1] and task.reference["answer"] == 18
    assert gsm8k_answer("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 1,018\n\nQuestion: next 5") == 1018
    assert gsm8k_answer("so she makes $18 a day.\nQuestion: 7") == 18
    assert gsm8k_answer("no number") is None


def test_mmlu_letter():
    task = mmlu_tasks(1)[0]
    assert task.prompt.endswith("D. 6\nAnswer:") and task.reference["answer"] == "A"
    assert score_mmlu(task, " A") and not score_mmlu(task, " B") and not score_mmlu(task, "")


def test_wilson_interval():
    lo, hi = e2e.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert e2e.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_best_se_bounds_every_setting():
    """The ceiling line: the small model proposes long where it is always accepted, short where it
    rarely is, in either ensemble order, and no gammas beat the ceiling."""
    costs = [ForwardCost(0.077, 0.0005), ForwardCost(0.182, 0.00105)]  # small, large: the CPU's
    weighted, contrastive = e2e.ENSEMBLES["weighted-t1"], e2e.ENSEMBLES["contrastive-t1"]
    assert e2e.best_se([1.0, 1.0], costs, weighted)[0] == [MAX_GAMMA, 1]
    assert e2e.best_se([1.0, 1.0], costs, contrastive)[0] == [1, MAX_GAMMA]  # ensemble order: large first
    assert e2e.best_se([0.3, 0.3], costs, weighted)[0][0] <= 2
    gammas, ceiling = e2e.best_se([0.96, 0.9], costs, weighted)
    ensemble = cycle_rate("ensemble", costs)
    for g in ([6, 1], [4, 2], [16, 16], gammas):
        assert cycle_rate("se", costs, g, [0.96, 0.9]) / ensemble <= ceiling + 1e-12
    assert ceiling == pytest.approx(cycle_rate("se", costs, gammas, [0.96, 0.9]) / ensemble)


def test_e2e_runs_resumes_and_refuses_other_settings(tmp_path):
    args = ["--models", "tiny-random-llama", "tiny-random-qwen2", "--limit", "2", "--datasets", "humaneval",
            "mmlu", "--ensembles", "weighted-greedy", "--methods", "ensemble", "se", "tf-ensemble",
            "tf-assisted-ens", "--no-alone", "--max-new-tokens", '{"humaneval": 12}', "--out", str(tmp_path)]
    e2e.main(args)
    store = json.loads((tmp_path / "e2e-cpu.json").read_text())
    assert len(store["runs"]) == 2 * 2 * 4
    assert all(r["tokens"] >= 1 for r in store["runs"].values())
    report = (tmp_path / "e2e-cpu.md").read_text()
    assert "se's text identical to ensemble's on 2 of 2 tasks" in report  # greedy: se is exact
    assert (tmp_path / "e2e-cpu-weighted-greedy.png").stat().st_size > 0
    new = ["single-small", "sd-int8", "sd-int4"]
    e2e.main([*args, "--methods", "ensemble", "se", *new])  # runs the new methods alone
    again = json.loads((tmp_path / "e2e-cpu.json").read_text())
    assert len(again["sessions"]) == 2 and len(again["runs"]) == len(store["runs"]) + 2 * 2 * len(new)
    assert all(again["runs"][k] == v for k, v in store["runs"].items())
    assert set(again["drafter_costs"]) == {"int8", "int4"}  # measured when they joined
    report = (tmp_path / "e2e-cpu.md").read_text()
    for method in ("sd-int8", "sd-int4"):  # greedy: the ensemble's text
        rows = [line for line in report.splitlines() if line.startswith(f"| {method} | ")]
        assert len(rows) == 2 and all(r.endswith(" | 2/2 |") for r in rows)
    with pytest.raises(SystemExit, match="other settings"):
        e2e.main([*args[:-4], "--max-new-tokens", '{"humaneval": 13}', "--out", str(tmp_path)])


def test_nested_benchmark_runs_on_tiny_models(tmp_path, monkeypatch):
    from bench import env, nested

    monkeypatch.setattr(nested, "run_alone", lambda fn: (fn(), 0))  # the test shares the CPU
    nested.main(["--models", "tiny-random-llama", "tiny-random-qwen2-deep", "--prompts", "2", "--max-new-tokens",
                 "8", "--thresholds", "0.5", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "nested-cpu.json").read_text())["rows"]
    assert [(r["target"], r["draft"].split(" [")[0]) for r in rows] == [
        (t, d) for t in ("large", "small + large") for d in ("none (baseline)", "small", "nested small", "nested large")]
    assert all(r["tokens"] == 16 for r in rows) and all(r["exits"] for r in rows if r["draft"].startswith("nested"))
    assert env.header()["machine"] in (tmp_path / "nested-cpu.md").read_text()
