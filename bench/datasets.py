"""The benchmark datasets shipped in ``bench/data`` (licences in its README): prompts, and the quality
metric of a completion.

Each dataset turns a record into a raw-completion prompt (no chat template) and scores the text a
model wrote after it:
    humaneval  pass@1: ``prompt + completion + test + check(entry_point)`` runs in a subprocess with
               a timeout; the completion is cut at the first line that starts a new top-level
               statement (the stop sequences of the Codex paper), as the usual harnesses do
    gsm8k      accuracy: the few-shot chain-of-thought prompt of the datasets README; the answer is
               the number after the first ``####`` of the completion (else its last number), cut at
               the next ``Question:``
    mmlu       accuracy: zero-shot, four lettered choices then ``Answer:``; the first letter of the
               completion must be the right one
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATASETS = Path(__file__).resolve().parent / "data"
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
LETTERS = "ABCD"


@dataclass(frozen=True)
class Task:
    prompt: str
    reference: dict  # the record fields its score needs


@dataclass(frozen=True)
class Dataset:
    load: Callable[[int], list[Task]]    # the first n tasks
    score: Callable[[Task, str], bool]   # whether a completion is right
    max_new_tokens: int                  # default generation budget


def records(name: str, n: int) -> list[dict]:
    with open(DATASETS / name) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def humaneval_tasks(n: int) -> list[Task]:
    return [Task(r["prompt"], {"test": r["test"], "entry_point": r["entry_point"]})
            for r in records("humaneval.jsonl", n)]


def humaneval_program(task: Task, completion: str) -> str:
    """The program whose exit status is the completion's verdict."""
    cut = min((i for s in HUMANEVAL_STOPS if (i := completion.find(s)) >= 0), default=len(completion))
    return f"{task.prompt}{completion[:cut]}\n\n{task.reference['test']}\n\ncheck({task.reference['entry_point']})\n"


def score_humaneval(task: Task, completion: str, timeout_s: float = 10.0) -> bool:
    """Runs the tests on model-written code: in a fresh interpreter (-I: no site or user paths), in
    an empty temporary directory, killed after ``timeout_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(humaneval_program(task, completion))
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def gsm8k_tasks(n: int) -> list[Task]:
    template = (DATASETS / "gsm8k_fewshot_prompt.txt").read_text()
    if "{{question}}" not in template:
        raise ValueError("gsm8k_fewshot_prompt.txt has no {{question}} placeholder")
    return [Task(template.replace("{{question}}", r["question"]), {"answer": _number(r["answer"].split("####")[-1])})
            for r in records("gsm8k_test.jsonl", n)]


def _number(text: str) -> float | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(found[-1].replace(",", "")) if found else None


def gsm8k_answer(completion: str) -> float | None:
    text = completion.split("Question:")[0]
    if "####" in text:
        return _number(text.split("####")[1].split("\n")[0])
    return _number(text)


def score_gsm8k(task: Task, completion: str) -> bool:
    answer = gsm8k_answer(completion)
    return answer is not None and abs(answer - task.reference["answer"]) < 1e-6


def mmlu_tasks(n: int) -> list[Task]:
    tasks = []
    for r in records("mmlu_validation.jsonl", n):
        choices = "".join(f"{letter}. {c}\n" for letter, c in zip(LETTERS, r["choices"]))
        subject = r["subject"].replace("_", " ")
        prompt = (f"The following is a multiple choice question about {subject}. Answer with the letter of the "
                  f"correct choice.\n\n{r['question']}\n{choices}Answer:")
        tasks.append(Task(prompt, {"answer": LETTERS[r["answer"]]}))
    return tasks


def score_mmlu(task: Task, completion: str) -> bool:
    text = completion.strip()
    return bool(text) and text[0] == task.reference["answer"]


DATASETS_BY_NAME = {
    "humaneval": Dataset(humaneval_tasks, score_humaneval, 128),
    "gsm8k": Dataset(gsm8k_tasks, score_gsm8k, 128),
    "mmlu": Dataset(mmlu_tasks, score_mmlu, 1),
}
