"""Evaluation protocols: the paper's scoring reproduced against its own code's libraries, on TRACE-shaped data;
`knowstack score` on predictions made elsewhere; budgets that never cut a real answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowstack.cli import main
from knowstack.config import TaskConfig
from knowstack.data.tasks import TRACE_TASK_METRICS, task_from_config
from knowstack.errors import KnowstackError
from knowstack.evaluate.metrics import PER_EXAMPLE, edit_similarity_trace_one, rouge_l_trace_one
from knowstack.evaluate.new_knowledge import score_given_predictions
from knowstack.evaluate.predictions import read_predictions
from knowstack.evaluate.protocols import PROTOCOLS, READERS, budget_for, scorings

FIXTURES = Path(__file__).parent / "fixtures" / "trace"
SUMMARIES = [
    ("The council adopted the ordinance. Motion carries.", "Recommendation to adopt the ordinance. Motion carries."),
    ("Recommendation to receive and file the report on the harbor budget",
     "Recommendation to receive the harbor report. And file it."),
    ("a b c. d e f", "d e f. a b c"),
    ("Same words here", "same WORDS here"),
    ("Approve the minutes.", ""),
    ("...", "Adopt the resolution."),
]


def test_trace_fixtures_have_the_release_layout() -> None:
    for name in TRACE_TASK_METRICS:
        for split in ("train", "eval", "test"):
            records = json.loads((FIXTURES / name / f"{split}.json").read_text(encoding="utf-8"))
            assert records and all(set(r) == {"prompt", "answer"} for r in records)
    science = json.loads((FIXTURES / "ScienceQA" / "test.json").read_text())[0]["answer"]
    assert science[0] in "ABCD" and science[1] == "\n" and len(science.split()) > 20


def trace_task(name: str, root: Path = FIXTURES):
    return task_from_config(TaskConfig(name=name, path=root / name, metric=TRACE_TASK_METRICS[name]))


@pytest.mark.parametrize("name", list(TRACE_TASK_METRICS))
@pytest.mark.parametrize("protocol", ["paper", "builtin"])
def test_a_perfect_prediction_scores_the_maximum_on_every_trace_task(name: str, protocol: str) -> None:
    task = trace_task(name)
    examples = task.load("test")
    score = score_given_predictions(examples, [e.answer for e in examples], task.metric, protocol)
    (metric, value), = score.scores.items()
    assert metric == task.metric and score.protocol == protocol
    if metric == "sari":
        # SARI of the reference itself is below 1 when the source (the whole prompt) repeats an n-gram the
        # reference keeps once: that deletion counts as wrong (Xu et al.; HF evaluate's sari alike).
        assert value > 0.99
    else:
        assert value == pytest.approx(1.0, abs=1e-6)  # rouge==1.0.1 adds 1e-8 to its F's denominator
    assert score.per_example[metric] == [row["scores"][metric] for row in score.predictions]
    assert len(score.per_example[metric]) == len(examples)


def test_paper_accuracy_is_the_first_character_rule() -> None:
    # RhuiDih/cl print_traceeval.py: stripped output's first character vs the reference's first character.
    task = trace_task("ScienceQA")
    examples = task.load("test")[:4]
    letters = [e.answer[0] for e in examples]
    predictions = [f"  {letters[0]}\nbecause of something else entirely", letters[1], "", "Z" + examples[3].answer[1:]]
    paper = score_given_predictions(examples, predictions, "accuracy", "paper")
    assert paper.per_example["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    # The built-in rule wants the whole answer: an explanation cut short scores 0.
    builtin = score_given_predictions(examples, [e.answer[:30] for e in examples], "accuracy", "builtin")
    assert builtin.scores["accuracy"] == 0.0
    assert READERS["first-char"]("B") == "B" and READERS["first-char"]("  ") == ""


@pytest.mark.parametrize(("prediction", "reference"), SUMMARIES)
def test_paper_rouge_l_is_rouge_1_0_1_as_trace_calls_it(prediction: str, reference: str) -> None:
    from rouge import Rouge

    if not prediction or not reference:
        expected = 0.0
    else:
        try:
            expected = Rouge(metrics=["rouge-l"]).get_scores(reference, prediction, avg=True)["rouge-l"]["f"]
        except ValueError:  # the package cannot score it; RhuiDih/cl counts it 0
            expected = 0.0
    assert rouge_l_trace_one(prediction, reference) == pytest.approx(expected, abs=0)


def test_paper_rouge_l_differs_from_rouge_score_on_multi_sentence_summaries() -> None:
    from knowstack.evaluate.metrics import rouge_l_f1

    prediction, reference = SUMMARIES[2]
    assert rouge_l_trace_one(prediction, reference) == pytest.approx(1.0, abs=1e-6)  # sentence order is free
    assert rouge_l_f1(prediction, reference) == pytest.approx(0.5)  # one LCS over the whole text


@pytest.mark.parametrize(("prediction", "reference"), [
    ("return self . host", "return ( self . host , self . port )"),
    ("x = <NUM_LIT:1>", "x = 1"),
    (" if x :", "if x :"),
    ("elif zmq_socket_type in ( zmq . REQ , zmq . REP ) :", "elif zmq_socket_type in ( zmq . REQ ) :"),
    ("abc", "abc"),
])
def test_paper_edit_similarity_is_fuzzywuzzy_ratio(prediction: str, reference: str) -> None:
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    from knowstack.evaluate.metrics import restore_literals

    expected = fuzz.ratio(restore_literals(prediction), restore_literals(reference)) / 100
    assert edit_similarity_trace_one(prediction, reference) == expected
    assert PER_EXAMPLE["edit_similarity_trace"]([""], [reference], [""]) == [0.0]


def test_paper_numglue_is_exact_match_and_not_first_character() -> None:
    task = trace_task("NumGLUE-ds")
    examples = task.load("test")[:2]
    wrong = examples[0].answer + "0"  # same first character, another number
    score = score_given_predictions(examples, [wrong, f" {examples[1].answer}\n"], "exact_match", "paper")
    assert score.per_example["exact_match"] == [0.0, 1.0]


def test_builtin_budget_grows_to_the_longest_reference_and_paper_budget_is_fixed() -> None:
    accuracy = scorings("builtin", "accuracy")[0]
    assert budget_for(accuracy, [1, 3, 6]) == 6  # the built-in world's answers fit: its budget is unchanged
    assert budget_for(accuracy, [2, 8]) == 12  # an 8-token label can be answered
    assert budget_for(accuracy, [2, 8], override=5) == 5
    assert budget_for(scorings("paper", "rouge_l")[0], [900]) == 512
    for protocol in PROTOCOLS.values():
        for declared in protocol.values():
            for scoring in declared:
                assert scoring.implementation in PER_EXAMPLE or scoring.harness_task
                assert scoring.reader in READERS and scoring.reference_reader in READERS


def test_gsm8k_offline_scoring_uses_the_harness_yaml() -> None:
    pytest.importorskip("lm_eval")
    from knowstack.evaluate.gsm8k import score_offline

    generations = ["She has 12 left.\n#### 12", "The answer is 1,200.", "no number", "It is 7.\n\nQ: next question 99"]
    answers, scores = score_offline("gsm8k_cot", generations, ["12", "1200", "3", "7"])
    # flexible-extract: the last number-like match; commas and a final '.' ignored; cut at the stop string 'Q:'.
    assert scores == [1.0, 1.0, 0.0, 1.0]
    assert answers[1] == "1,200." and answers[2] == "[invalid]"


def write_predictions(path: Path, predictions: list[str], *, jsonl: bool = True) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps({"prediction": p}) + "\n" for p in predictions), encoding="utf-8")
    else:
        path.write_text(json.dumps(predictions), encoding="utf-8")
    return path


def test_score_command_prints_json_and_writes_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    references = [r["answer"] for r in json.loads((FIXTURES / "ScienceQA" / "test.json").read_text())]
    predictions = [references[0][0], "Z", references[2], references[3][:1] + " and more"]
    file = write_predictions(tmp_path / "p.jsonl", predictions)
    out = tmp_path / "rows.jsonl"
    assert main(["score", str(FIXTURES / "ScienceQA"), "--predictions", str(file), "--protocol", "paper",
                 "--json", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.75}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scores"]["accuracy"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    assert rows[1]["prediction"] == "Z" and rows[0]["reference"] == references[0]
    as_list = write_predictions(tmp_path / "p.json", predictions, jsonl=False)
    assert main(["score", str(FIXTURES / "ScienceQA"), "--predictions", str(as_list)]) == 0
    assert "accuracy: 0.2500" in capsys.readouterr().out  # builtin: the whole answer must match


def test_score_command_rejects_a_count_mismatch_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = write_predictions(tmp_path / "p.jsonl", ["A", "B"])
    assert main(["score", str(FIXTURES / "FOMC"), "--predictions", str(file)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the console may wrap a long path's line
    assert "2 predictions for 4 test items" in err and str(file) in err and "Traceback" not in err
    (tmp_path / "bad.jsonl").write_text('{"prediction": "A"}\n{"answer": "B"}\n')
    with pytest.raises(KnowstackError, match="line 2 has no string"):
        read_predictions(tmp_path / "bad.jsonl", 2)
    custom = tmp_path / "my-task"
    custom.mkdir()
    (custom / "test.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    assert main(["score", str(custom), "--predictions", str(write_predictions(tmp_path / "q.json", ["a"]))]) == 2
    assert "give --metric" in capsys.readouterr().err


def test_a_task_without_a_train_split_is_scored_not_trained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    task_dir = tmp_path / "FOMC"
    task_dir.mkdir()
    (task_dir / "test.json").write_text((FIXTURES / "FOMC" / "test.json").read_text())
    task = trace_task("FOMC", tmp_path)
    assert task.train_path is None and len(task.load("test")) == 4
    with pytest.raises(KnowstackError, match="no train split.*evaluated, not trained"):
        task.load("train")
    file = write_predictions(tmp_path / "p.json", [e.answer for e in task.load("test")], jsonl=False)
    assert main(["score", str(task_dir), "--predictions", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 1.0}


def test_math_predictions_are_scored_by_each_protocol(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    test_file = FIXTURES / "math" / "gsm8k_test.jsonl"
    finals = [json.loads(line)["answer"].split("####")[-1].strip() for line in test_file.read_text().splitlines()]
    file = write_predictions(tmp_path / "p.json", [f"So she has {a} pencils.\nThe answer is: {a}" for a in finals],
                             jsonl=False)
    assert main(["score", str(test_file), "--format", "math", "--predictions", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"em_cot": 1.0}  # the direct answer needs its own generation
    assert main(["score", str(test_file), "--format", "math", "--predictions", str(file), "--protocol", "paper",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"gsm8k": 1.0, "gsm8k_cot": 1.0}


def test_a_long_label_gets_the_budget_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from knowstack.data.formats import Example
    from knowstack.evaluate import new_knowledge

    budgets: list[int] = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, stop_strings=None, stats=None):
        budgets.append(max_new_tokens)
        if stats is not None:
            stats["prompts_truncated"] = 1
        return ["iso8859_10", "utf_8"]

    class CharTokenizer:
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [list(text) for text in texts]}

    monkeypatch.setattr(new_knowledge, "generate", fake_generate)
    examples = [Example("latin6 ->", "iso8859_10"), Example("u8 ->", "utf_8")]
    score = new_knowledge.evaluate_task(None, CharTokenizer(), examples, "accuracy")
    assert budgets == [14] and score.scores == {"accuracy": 1.0}  # 10 characters as tokens, + 4
    assert score.max_new_tokens == {"accuracy": 14} and score.references_over_budget == {"accuracy": 0}
    assert score.prompts_truncated == 1 and score.record()["protocol"] == "builtin"


def test_results_rows_keep_their_protocol(tmp_path: Path) -> None:
    import sqlite3

    from knowstack.results import Row, read_csv, write_csv, write_sqlite

    rows = [Row("base", "base", "", None, "ScienceQA", "new", "accuracy", 0.5, 4, "", protocol="paper"),
            Row("base", "base", "", None, "ks_country", "old", "acc", 0.9, None, "", protocol="lm-eval")]
    write_csv(rows, tmp_path / "results.csv")
    assert [r.protocol for r in read_csv(tmp_path / "results.csv")] == ["paper", "lm-eval"]
    write_sqlite(rows, tmp_path / "results.sqlite")
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT protocol FROM results ORDER BY kind").fetchall() == [("paper",), ("lm-eval",)]


def test_a_tasks_own_protocol_keys_its_evaluations_not_its_training(tmp_path: Path) -> None:
    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan

    def plan(task_protocol: str | None):
        task = {"name": "FOMC", "path": str(FIXTURES / "FOMC"), "metric": "accuracy"}
        if task_protocol:
            task["protocol"] = task_protocol
        raw = {"name": "t", "base": {"model": "some/model"}, "tasks": [task],
               "old_knowledge": {"tasks": ["arc_easy"]}, "training": {"lr": 1e-4},
               "evaluation": {"protocol": "paper"}, "methods": {"one-round": {"finetune": ["lora"]}}}
        steps = build_plan(parse_config(raw)).ordered()
        return {s.key for s in steps if s.kind == "train"}, {s.key for s in steps if s.kind == "eval"}

    (train_a, eval_a), (train_b, eval_b) = plan(None), plan("builtin")
    assert train_a == train_b and not eval_a & eval_b


@pytest.mark.slow
def test_gsm8k_through_the_harness_agrees_with_offline_scoring(tiny_model_dir: Path) -> None:
    from knowstack.evaluate.gsm8k import evaluate_gsm8k, score_offline
    from knowstack.modelio import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)
    test_file = FIXTURES / "math" / "gsm8k_test.jsonl"
    finals = [json.loads(line)["answer"].split("####")[-1].strip() for line in test_file.read_text().splitlines()]
    for task, fewshot in (("gsm8k", FIXTURES / "math" / "gsm8k_train.json"), ("gsm8k_cot", None)):
        run = evaluate_gsm8k(model, tokenizer, task, test_file, fewshot=fewshot, limit=2, batch_size=2, max_gen_toks=12)
        assert len(run.generations) == 2 and run.max_gen_toks == 12
        answers, scores = score_offline(task, run.generations, finals[:2])
        assert answers == run.answers and scores == run.scores
