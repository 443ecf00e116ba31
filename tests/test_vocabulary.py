"""One vocabulary (issue 32, items 4 and 5): docs/commands.md's option table is the parsers', an option shared by
commands has one meaning and every option has help; old names work and say so; positional arguments have their
option form; percentages refuse a bare fraction; --json beside text; and no option a merge method does not read is
accepted (DARE's density is mergekit's, mergekit's method names are aliases)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from checkpoints import perturbed

from knowstack.cli import build_parser, command_parser, main, worded_for_command
from knowstack.cli.common import percent
from knowstack.cli.vocabulary import (
    MEANINGS,
    DeprecatedAlias,
    commands,
    options,
    positional_or_option,
    vocabulary_table,
)
from knowstack.combine.merges import METHODS, get_method, mergekit_aliases
from knowstack.errors import KnowstackError
from knowstack.registry.compose import options_from

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- numbers:vocabulary -->\n(.*?)<!-- /numbers -->", re.S)


def _meaning_of(help_text: str) -> str:
    """A help without its trailing default: what the option means."""
    return re.sub(r"\(default[^)]*\)", "", help_text.replace("%%", "%")).strip(" :;")


# --- the table and the one meaning of each name --------------------------------------------------------------
def test_the_vocabulary_table_in_the_docs_is_the_parsers() -> None:
    match = BLOCK.search((ROOT / "docs" / "commands.md").read_text(encoding="utf-8"))
    assert match, "docs/commands.md has no vocabulary block"
    assert match[1].rstrip("\n") == vocabulary_table(build_parser()), \
        "docs/commands.md's vocabulary table is stale: run python scripts/docs_numbers.py --vocabulary"


def test_an_option_of_several_commands_means_one_thing() -> None:
    seen: dict[str, list[tuple[str, argparse.Action]]] = {}
    for command, parser in commands(build_parser()):
        for action in options(parser):
            if not isinstance(action, DeprecatedAlias):
                seen.setdefault(action.option_strings[0], []).append((command, action))
    shared = {flag: uses for flag, uses in seen.items() if len(uses) > 1}
    assert {"--batch-size", "--eval-batch-size", "--router-steps", "--old-tasks", "--task", "--json"} <= set(shared)
    for flag, uses in shared.items():
        assert flag in MEANINGS, f"{flag} is taken by {[c for c, _ in uses]}: give it one meaning in MEANINGS"
        for command, action in uses:
            assert (action.help or "").replace("%%", "%").startswith(MEANINGS[flag]), \
                f"{command} {flag}: its help does not start with the option's meaning {MEANINGS[flag]!r}"
        assert len({action.type for _, action in uses}) == 1, f"{flag} reads different types in {uses}"
    # an old name never takes over a name in use in the same command
    for command, parser in commands(build_parser()):
        names = [name for action in options(parser) for name in action.option_strings]
        assert len(names) == len(set(names)), command


def test_every_option_has_help() -> None:
    for command, parser in commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, DeprecatedAlias)):
                continue
            assert _meaning_of(action.help or ""), f"{command} {action.option_strings or action.dest} has no help"


def test_the_router_options_name_each_choice_in_the_docs_table() -> None:
    """The table keeps a help's words before its '(default', so a choice explained only there (as --router-init's
    per-module was) is lost from docs/commands.md."""
    rows = {line.split(" | ")[0].strip("| `"): line for line in vocabulary_table(build_parser()).splitlines()}
    mix = dict(commands(build_parser()))["mix"]
    for flag in ("--router-init", "--router-dtype"):
        action = next(action for action in options(mix) if action.option_strings[0] == flag)
        for choice in action.choices:
            assert choice in rows[flag].split(" | ")[1], f"{flag}: the docs table does not say what {choice} is"


# --- old names, positional arguments, percentages, JSON -----------------------------------------------------
@pytest.mark.parametrize("argv, dest, value", [
    (["mix", "--base", "B", "--models", "M", "--out", "O", "--train-steps", "3"], "router_steps", 3),
    (["mix", "--base", "B", "--models", "M", "--out", "O", "--train-lr", "0.5"], "router_lr", 0.5),
    (["mix", "--base", "B", "--models", "M", "--out", "O", "--train-batch-size", "4"], "router_batch_size", 4),
    (["registry", "init", "R", "--base", "B", "--old-knowledge", "t1", "t2"], "old_tasks", ["t1", "t2"]),
    (["eval", "--model", "M", "--batch-size", "4"], "eval_batch_size", 4),
    (["contribute", "R", "--name", "n", "--adapter", "A", "--task", "T", "--batch-size", "4"], "eval_batch_size", 4),
    (["statistics", "M", "--out", "O", "--data", "D.json"], "train_data", "D.json"),
    (["compose", "R", "--method", "sequential", "--train-batch-size", "4"], "train_batch_size", 4),
])
def test_an_old_name_still_works_and_says_the_new_one(argv: list[str], dest: str, value: object,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    old = argv[-2] if not isinstance(value, list) else argv[-3]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: {old} is deprecated: write --" in err


def test_the_new_names_say_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["mix", "--base", "B", "--models", "M", "--out", "O", "--router-steps", "3",
                                      "--router-batch-size", "2"])
    assert (args.router_steps, args.router_batch_size) == (3, 2) and capsys.readouterr().err == ""
    defaults = build_parser().parse_args(["mix", "--base", "B", "--models", "M", "--out", "O"])
    assert defaults.router_steps == 0 and defaults.router_batch_size == 8


def test_compose_batch_size_is_training_and_says_it_changed(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["compose", "R", "--method", "sequential", "--batch-size", "4",
                                      "--eval-batch-size", "2"])
    assert (args.train_batch_size, args.eval_batch_size) == (4, 2)
    assert "--eval-batch-size" in capsys.readouterr().err


def test_a_positional_argument_has_its_option_form() -> None:
    for argv in (["score", "T", "--predictions", "P"], ["score", "--task", "T", "--predictions", "P"]):
        args = build_parser().parse_args(argv)
        positional_or_option(args, "task", "--task")
        assert args.task == "T"
    args = build_parser().parse_args(["statistics", "--model", "M", "--train-data", "D", "--out", "O"])
    positional_or_option(args, "model", "--model")
    assert args.model == "M"
    with pytest.raises(KnowstackError, match="once"):
        positional_or_option(build_parser().parse_args(["score", "T", "--task", "U", "--predictions", "P"]),
                             "task", "--task")
    with pytest.raises(KnowstackError, match="--task"):
        positional_or_option(build_parser().parse_args(["score", "--predictions", "P"]), "task", "--task")


def test_a_percentage_is_written_with_its_sign_and_a_bare_fraction_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert percent("2%") == 2.0 and percent("0.02%") == 0.02 and percent("2") == 2.0 and percent("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"0.02 is ambiguous: write 2% .* or 0.02%"):
        percent("0.02")
    for argv in (["advise", "D", "--max-old-loss", "0.02"], ["compose", "R", "--method", "merge-ties",
                                                             "--gate-old", "0.5"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2 and "ambiguous" in capsys.readouterr().err
    assert build_parser().parse_args(["advise", "D", "--max-old-loss", "0.02%"]).max_old_loss == 0.02


def test_eval_prints_text_and_json_when_asked(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack import api

    monkeypatch.setattr(api, "evaluate", lambda *a, **k: {"ks_country_code": {"acc": 0.25}})
    argv = ["eval", "--model", str(tiny_model_dir), "--old-tasks", "ks_country_code"]
    monkeypatch.setattr("knowstack.validate.check_old_tasks", lambda *a, **k: [])
    assert main(argv) == 0
    assert capsys.readouterr().out == "ks_country_code acc: 0.2500\n"
    assert main([*argv, "--json", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "s.json").read_text())


# --- no option a merge method does not read ---------------------------------------------------------------
def test_each_method_reads_only_what_it_declares() -> None:
    with pytest.raises(KnowstackError, match=r"'average' does not read --density: it reads no options"):
        get_method("average").options_from({"density": 0.5})
    with pytest.raises(KnowstackError, match=r"'dare' does not read --gamma: it reads --drop-rate, --lambda, --seed, "
                                             r"--density \(the fraction kept\)"):
        METHODS["dare"].options_from({"gamma": 0.1})
    with pytest.raises(KnowstackError, match=r"'ties' does not read --drop-rate: it reads --density, --lambda"):
        get_method("ties").options_from({"drop_rate": 0.5})
    with pytest.raises(KnowstackError, match=r"'slerp' does not read --seed"):
        get_method("slerp").options_from({"seed": 3})
    for method in METHODS.values():  # every declared option is accepted by its method
        given = {option: 0.1 if option not in ("max_iter", "seed") else 2 for option in method.options}
        method.options_from(given)
    assert get_method("ties").options_from({"lam": 0.5, "lora_space": "factors"}).lam == 0.5


def test_dare_density_is_the_fraction_kept() -> None:
    for name in ("dare", "ties-dare"):
        assert get_method(name).options_from({"density": 0.1}).drop_rate == pytest.approx(0.9)
        assert get_method(name).options_from({"density": 0.1, "drop_rate": 0.9}).drop_rate == pytest.approx(0.9)
        with pytest.raises(KnowstackError, match="contradict"):
            get_method(name).options_from({"density": 0.9, "drop_rate": 0.9})


def test_mergekit_names_are_aliases() -> None:
    aliases = mergekit_aliases()
    assert aliases["linear"] == "average" and aliases["dare_ties"] == "ties-dare"
    assert aliases["task_arithmetic"] == "task-arithmetic" and aliases["model_stock"] == "model-stock"
    assert "ties" not in aliases  # the same name in both
    assert get_method("breadcrumbs_ties").name == "breadcrumbs-ties"
    assert set(aliases.values()) <= set(METHODS)


def test_compose_refuses_an_option_its_method_does_not_read() -> None:
    with pytest.raises(KnowstackError, match=r"'merge-ties' does not read --top-k: it reads --density, --lambda"):
        options_from({"density": 0.5, "top_k": 2, "registry": "R"}, "merge-ties")
    with pytest.raises(KnowstackError, match=r"'merge-average' does not read --batch-size"):
        options_from({"train_batch_size": 8}, "merge-average")
    with pytest.raises(KnowstackError, match=r"'moe-lora' does not read --density"):
        options_from({"density": 0.5}, "moe-lora")
    assert options_from({"density": 0.1}, "merge-dare").drop_rate == pytest.approx(0.9)
    assert options_from({"density": 0.5, "lam": 0.5}, "continual-merge-ties").density == 0.5
    assert options_from({"lr": 1e-4, "train_batch_size": 4, "seed": 1}, "sequential").train_batch_size == 4


def test_compose_names_an_unread_option_as_its_option() -> None:
    # the CLI words the error's field as the command's option: a field spelled as a flag was left as "field '--x'"
    parser = build_parser()
    args = parser.parse_args(["compose", "R", "--method", "merge-ties", "--router-dtype", "float16"])
    with pytest.raises(KnowstackError) as err:
        options_from(vars(args), args.method)
    assert worded_for_command(err.value, command_parser(parser, args), "compose") == \
        "option --router-dtype: 'merge-ties' does not read --router-dtype: it reads --density, --lambda"


@pytest.fixture(scope="module")
def two_finetunes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vocab-finetunes")
    return [perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.02) for i in range(2)]


def _weights(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.safetensors"))}


def test_merge_command_dare_density_and_mergekit_names(tiny_model_dir: Path, two_finetunes: list[Path],
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--base", str(tiny_model_dir), "--models", *map(str, two_finetunes)]
    assert main(["merge", "--method", "dare", *common, "--drop-rate", "0.1", "--out", str(tmp_path / "p")]) == 0
    assert main(["merge", "--method", "dare", *common, "--density", "0.9", "--out", str(tmp_path / "d")]) == 0
    assert main(["merge", "--method", "dare", *common, "--out", str(tmp_path / "default")]) == 0
    assert _weights(tmp_path / "d") == _weights(tmp_path / "p") != _weights(tmp_path / "default")
    record = json.loads((tmp_path / "d" / "merge.json").read_text())
    assert record["drop_rate"] == pytest.approx(0.1) and "density" not in record and record["seed"] == 0
    assert main(["merge", "--method", "linear", *common, "--out", str(tmp_path / "linear"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["method"] == "average" and "density" not in printed and "seed" not in printed
    assert main(["merge", "--method", "average", *common, "--out", str(tmp_path / "average")]) == 0
    assert _weights(tmp_path / "linear") == _weights(tmp_path / "average")
    capsys.readouterr()
    assert main(["merge", "--method", "average", *common, "--density", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "'average' does not read --density: it reads no options" in capsys.readouterr().err
    assert main(["merge", "--method", "dare", *common, "--density", "0.5", "--drop-rate", "0.9",
                 "--out", str(tmp_path / "x")]) == 2
    assert "contradict" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_api_arguments_have_the_options_names() -> None:
    from knowstack import api as ks

    with pytest.deprecated_call(match="batch_size= is deprecated: write eval_batch_size="), \
            pytest.raises(KnowstackError, match="nothing to evaluate"):
        ks.evaluate("model", batch_size=4)
    with pytest.deprecated_call(), pytest.raises(KnowstackError, match="disagree"):
        ks.mix("base", [], "out", router_steps=2, train_steps=3)
    with pytest.raises(KnowstackError, match="give router_steps too"):
        ks.mix("base", [], "out", train_data=["d.json"])


def test_a_study_config_setting_no_merge_of_its_section_reads_is_refused(tmp_path: Path) -> None:
    from knowstack.config import parse_config
    from knowstack.validate import check_merge_settings

    def problems(merge: dict, section: str = "merge") -> list[str]:
        raw = {"name": "m", "base": {"model": str(tmp_path)}, "tasks": [{"name": "t", "path": str(tmp_path), "metric": "accuracy"}],
               "old_knowledge": {"tasks": ["ks_x"]}, "methods": {"one-round": {"finetune": ["fft"]}, section: merge}}
        return [str(p) for p in check_merge_settings(parse_config(raw).methods)]

    assert problems({"methods": ["dare"], "density": 0.5}) == [
        "field 'methods.merge.density': none of dare reads density (read by ties, breadcrumbs, breadcrumbs-ties, "
        "della, della-linear)"]
    assert problems({"methods": ["average"], "sweep": {"lambda": [0.5, 1.0]}})[0].startswith(
        "field 'methods.merge.lambda': none of average reads lambda")
    assert problems({"methods": {"fft": ["ties"], "lora": ["ties-dare"]}, "density": 0.5, "drop_rate": 0.5}) == []
    assert problems({"methods": ["average", "ties"], "density": 0.5, "lambda": 0.5}, "continual-merge") == []
    assert problems({"methods": ["average"], "t": 0.3}, "continual-merge")[0].startswith(
        "field 'methods.continual-merge.t'")
