"""Config validation: good configs load, bad ones give one error naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from knowstack.config import load_config
from knowstack.errors import KnowstackError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal() -> dict:
    return {"name": "t", "base": {"builtin": "test"}, "training": {"lr": 1e-4},
            "methods": {"one-round": {"finetune": ["lora"]}}}


@pytest.mark.parametrize("name", ["builtin-quick.yaml", "builtin.yaml", "paper/llama3-8b-trace.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.methods.one_round is not None and config.methods.sequential is not None


def test_paper_config_has_the_papers_settings() -> None:
    config = load_config(CONFIGS / "paper/llama3-8b-trace.yaml")
    assert config.base.model == "meta-llama/Meta-Llama-3-8B"
    assert config.training.lr == 2e-5 and config.training.schedule == "constant"
    assert config.training.batch_size == 128  # 16 per GPU on the paper's 8 (docs/paper-config.md)
    assert [t.name for t in config.tasks] == ["cstance", "fomc", "meeting", "py150", "science", "20minuten", "math"]
    assert config.old_knowledge.tasks == [
        "mmlu", "arc_challenge", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "winogrande"]
    assert not config.base.trust_remote_code


def test_relative_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    data = minimal() | {"base": {"model": "m"}, "old_knowledge": {"tasks": ["x"]},
                        "tasks": [{"name": "a", "path": "data/A", "metric": "accuracy"}]}
    config = load_config(write(tmp_path, data))
    assert config.tasks[0].path == tmp_path / "data" / "A"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"methods": {"sequentail": {}}}, "methods.sequentail", "unknown field"),
        ({"training": {"lr": -1}}, "training.lr", "greater than 0"),
        ({"training": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 5}}, "training", "multiple"),
        ({"training": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 32}}, "training.micro_batch_size",
         "32 is larger than the batch size, 16"),
        ({"old_knowledge": {"tasks": ["x"]}, "base": {"model": "m"},
          "tasks": [{"name": "a", "path": "x", "metric": "accuracy", "micro_batch_size": 32}]},
         "tasks[0].micro_batch_size", "32 is larger than the batch size, 16"),
        ({"base": {}}, "base", "exactly one"),
        ({"base": {"builtin": "huge"}}, "base.builtin", "'test', 'quick' or 'full'"),
        ({"methods": {"one-round": {"finetune": ["qlora"]}}}, "methods.one-round.finetune[0]", "'fft' or 'lora'"),
        ({"tasks": [{"name": "a", "metric": "bleu", "path": "x"}]}, "tasks[0].metric", "accuracy"),
        ({"tasks": [{"name": "a", "metric": "accuracy"}]}, "tasks[0]", "give 'path'"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, change: dict, field: str, message: str) -> None:
    path = write(tmp_path, minimal() | change)
    with pytest.raises(KnowstackError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and f"field '{field}'" in text and message in text


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(KnowstackError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(KnowstackError, match="YAML mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    ("methods", "field", "message"),
    [
        ({"olora": {"lambdas": [-1]}}, "methods.olora.lambdas[0]", "greater than or equal to 0"),
        ({"olora": {"lambdas": [[0.5, -2]]}}, "methods.olora.lambdas[0][1]", "greater than or equal to 0"),
        ({"olora": {"lambdas": []}}, "methods.olora.lambdas", "at least one"),
        ({"olora": {"lambdas": [[]]}}, "methods.olora.lambdas", "must not be empty"),
        ({"olora": {"lambdas": [5, 5.0]}}, "methods.olora.lambdas", "must differ"),
        ({"olora": {"lamdas": [5]}}, "methods.olora.lamdas", "unknown field"),
        ({"olora": {"finetune": ["fft"]}}, "methods.olora.finetune", "unknown field"),
        ({"joint": {"sampling": "random"}}, "methods.joint.sampling", "'uniform' or 'proportional'"),
        ({"joint": {"finetune": []}}, "methods.joint.finetune", "at least one"),
        ({"replay": {"fraction": 0}}, "methods.replay.fraction", "greater than 0"),
        ({"replay": {"fraction": 10}}, "methods.replay.fraction", "less than or equal to 1"),
        ({"replay": {"finetune": ["qlora"]}}, "methods.replay.finetune[0]", "'fft' or 'lora'"),
    ],
)
def test_bad_olora_joint_replay_fields_are_named(tmp_path: Path, methods: dict, field: str, message: str) -> None:
    path = write(tmp_path, minimal() | {"methods": methods})
    with pytest.raises(KnowstackError) as err:
        load_config(path)
    text = str(err.value)
    assert f"field '{field}'" in text and message in text


def test_olora_joint_replay_defaults_and_shapes(tmp_path: Path) -> None:
    methods = {"olora": {}, "joint": {}, "replay": {}}
    config = load_config(write(tmp_path, minimal() | {"methods": methods}))
    assert config.methods.olora.lambdas == [0.5, 5.0]  # the paper's two runs
    assert config.methods.joint.sampling == "uniform" and config.methods.joint.finetune == ["fft", "lora"]
    assert config.methods.replay.fraction == 0.1 and config.methods.replay.finetune == ["fft", "lora"]
    methods = {"olora": {"lambdas": 2}, "joint": {"finetune": ["lora"], "sampling": "proportional"}}
    config = load_config(write(tmp_path, minimal() | {"methods": methods}))
    assert config.methods.olora.lambdas == [2.0] and config.methods.joint.sampling == "proportional"
    per_round = load_config(write(tmp_path, minimal() | {"methods": {"olora": {"lambdas": [0.5, [0, 1, 5]]}}}))
    assert per_round.methods.olora.lambdas == [0.5, [0.0, 1.0, 5.0]]


def test_builtin_config_runs_olora_joint_and_replay() -> None:
    methods = load_config(CONFIGS / "builtin.yaml").methods
    assert methods.olora is not None and methods.olora.lambdas == [0.5, 5.0]
    assert methods.joint is not None and methods.joint.finetune == ["fft", "lora"]
    assert methods.replay is not None and methods.replay.fraction == 0.1
    quick = load_config(CONFIGS / "builtin-quick.yaml").methods
    assert quick.olora is None and quick.joint is None and quick.replay is None  # the demo's time budget
