"""scripts/docs_numbers.py: the docs' figures are rewritten from results dirs, and a missing one is a clear error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script as load_script_module

from knowstack.results import write_csv
from tests.report_rows import OLD, synthetic_study

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "docs_numbers.py"
README = """# project

Intro, with a number that is not a figure: Python 3.10+.

<!-- numbers:demo-base -->
stale: the base scores 0.99 everywhere
<!-- /numbers -->

Between the blocks.

<!-- numbers:registry-scenario -->
a registry table nobody regenerated here
<!-- /numbers -->
"""
DESIGN = """# design

<!-- numbers:demo-study -->
old
<!-- /numbers -->
"""


def load_script() -> ModuleType:
    return load_script_module(SCRIPT)


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(README)
    (root / "docs" / "design.md").write_text(DESIGN)
    return root


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    run = tmp_path / "demo"
    world = run / "artifacts" / "world-quick-0123456789ab"
    world.mkdir(parents=True)
    (run / "artifacts" / "eval-base-0123456789ab").mkdir()
    manifest = {"preset": "quick", "fingerprint": "f00dfeedf00dfeed", "build_seconds": 1.5,
                "environment": {"python": "3.11.7", "torch": "2.13.0", "torch_threads": 2}}
    (world / "world.json").write_text(json.dumps(manifest))
    write_csv(synthetic_study(("base", "one-round", "sequential")), run / "results.csv")
    return run


def test_blocks_are_rewritten_from_the_results(checkout: Path, demo: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script()
    assert script.main(["--demo", str(demo), "--root", str(checkout)]) == 0
    readme = (checkout / "README.md").read_text()
    base_block = readme.split("<!-- numbers:demo-base -->\n")[1].split("<!-- /numbers -->")[0]
    assert "0.99" not in base_block and "f00dfeedf00dfeed" in base_block and "torch threads: 2" in base_block
    for task, value in OLD.items():
        assert f"{value:.2f} ({task})" in base_block
    # text outside the blocks, and the block whose results dir was not given, are left as they were
    assert readme.replace(base_block, "stale: the base scores 0.99 everywhere\n") == README
    design = (checkout / "docs" / "design.md").read_text()
    assert "sequential FFT: AVE" in design and "mean BWT" in design and "One round of FFT on each task" in design
    assert "kept registry-scenario" in capsys.readouterr().out
    # generated once, the docs are up to date: a check finds nothing to change
    assert script.main(["--demo", str(demo), "--root", str(checkout), "--check"]) == 0
    (checkout / "README.md").write_text(readme.replace(base_block, "drifted\n"))
    assert script.main(["--demo", str(demo), "--root", str(checkout), "--check"]) == 1


def test_a_missing_results_dir_is_one_clear_error(checkout: Path, tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "demo"
    done = subprocess.run([sys.executable, str(SCRIPT), "--demo", str(missing), "--root", str(checkout)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {missing}: field '--demo': no such results dir"
    assert (checkout / "README.md").read_text() == README  # nothing written


def test_a_dir_without_results_names_what_to_run(checkout: Path, demo: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script()
    (demo / "results.csv").unlink()
    assert script.main(["--demo", str(demo), "--root", str(checkout)]) == 2
    assert "no config.yaml or results.csv" in capsys.readouterr().err
    assert (checkout / "README.md").read_text() == README


def test_an_unknown_block_is_an_error(checkout: Path, demo: Path, capsys: pytest.CaptureFixture) -> None:
    (checkout / "docs" / "design.md").write_text(DESIGN + "<!-- numbers:typo -->\nx\n<!-- /numbers -->\n")
    assert load_script().main(["--demo", str(demo), "--root", str(checkout)]) == 2
    assert "unknown numbers block 'typo'" in capsys.readouterr().err
    assert (checkout / "README.md").read_text() == README  # README's block was generated, but not written


def test_the_spread_of_one_world_over_thread_counts(checkout: Path, demo: Path, tmp_path: Path) -> None:
    other = tmp_path / "demo-1-thread"
    shutil.copytree(demo, other)
    manifest_path = next((other / "artifacts").glob("world-*/world.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["environment"]["torch_threads"] = 1
    manifest["fingerprint"] = "0ther0ther0ther0"
    manifest_path.write_text(json.dumps(manifest))
    (checkout / "docs" / "design.md").write_text("<!-- numbers:world-spread -->\n<!-- /numbers -->\n")
    assert load_script().main(["--spread", str(demo), str(other), "--root", str(checkout)]) == 0
    table = (checkout / "docs" / "design.md").read_text()
    assert "| 2 | 3.11.7 | `f00dfeedf00dfeed`" in table and "| 1 | 3.11.7 | `0ther0ther0ther0`" in table
    assert f"{OLD['ks_country']:.2f}" in table


def _claims(run: Path, verdicts: dict[str, str]) -> None:
    (run / "tables").mkdir(exist_ok=True)
    lines = ["#,the paper's finding,verdict"] + [f"{name},finding {name},{v}" for name, v in verdicts.items()]
    (run / "tables" / "claims.csv").write_text("\n".join(lines) + "\n")


def test_the_verdicts_of_one_config_under_other_kernel_paths(checkout: Path, demo: Path, tmp_path: Path) -> None:
    other = tmp_path / "demo-avx2"
    shutil.copytree(demo, other)
    manifest_path = next((other / "artifacts").glob("world-*/world.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["environment"].update(cpu="AMD EPYC", torch_cpu_capability="AVX2", onednn_max_cpu_isa="AVX2",
                                   mkl_cbwr="AVX2,STRICT")
    manifest["fingerprint"] = "0ther0ther0ther0"
    manifest_path.write_text(json.dumps(manifest))
    _claims(demo, {"C1": "holds", "C2": "does not hold", "C3": "inconclusive"})
    _claims(other, {"C1": "holds", "C2": "inconclusive", "C3": "inconclusive"})
    (checkout / "docs" / "design.md").write_text("<!-- numbers:verdict-spread -->\n<!-- /numbers -->\n")
    assert load_script().main(["--verdicts", str(demo), str(other), "--root", str(checkout)]) == 0
    page = (checkout / "docs" / "design.md").read_text()
    assert "| C2 | does not hold | inconclusive |" in page and "| C1 | holds | holds |" in page
    assert "2 of 3 findings have the same verdict in every dir; the verdict changes for C2 (does not hold / " \
           "inconclusive)." in page
    assert "`demo-avx2`: world `0ther0ther0ther0`, CPU AMD EPYC: torch's AVX2 kernels" in page


def test_verdicts_of_a_study_without_its_report_are_one_clear_error(checkout: Path, demo: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    (checkout / "docs" / "design.md").write_text("<!-- numbers:verdict-spread -->\n<!-- /numbers -->\n")
    assert load_script().main(["--verdicts", str(demo), "--root", str(checkout)]) == 2
    err = capsys.readouterr().err
    assert "no tables/claims.csv" in err and str(demo) in err and "--verdicts" in err


def test_the_baselines_block_is_the_reports_continual_and_baselines_tables(demo: Path) -> None:
    script = load_script()
    with pytest.raises(script.KnowstackError, match="no tables/continual.md"):
        script.search_baselines(script.Study.read(demo, "--search"))
    (demo / "tables").mkdir()
    (demo / "tables" / "continual.md").write_text("| run | mean BWT |\n|---|---|\n| EWC FFT λ=100 | -55% |\n")
    (demo / "tables" / "baselines.md").write_text("| # | verdict |\n|---|---|\n| B1 | holds |\n")
    block = script.search_baselines(script.Study.read(demo, "--search"))
    assert "| EWC FFT λ=100 | -55% |" in block and "| B1 | holds |" in block and "f00dfeedf00dfeed" in block


def test_base_alone_writes_only_the_base_block(checkout: Path, demo: Path, capsys: pytest.CaptureFixture) -> None:
    assert load_script().main(["--base", str(demo), "--root", str(checkout)]) == 0
    assert "f00dfeedf00dfeed" in (checkout / "README.md").read_text()
    assert (checkout / "docs" / "design.md").read_text() == DESIGN  # demo-study needs --demo
    out = capsys.readouterr().out
    assert "README.md: rewrote demo-base; kept registry-scenario" in out and "docs/design.md: rewrote nothing" in out


def test_a_block_on_any_docs_page_is_rewritten(checkout: Path, demo: Path, capsys: pytest.CaptureFixture) -> None:
    (checkout / "docs" / "builtin-world.md").write_text("# world\n\n<!-- numbers:demo-time -->\nstale\n<!-- /numbers -->\n")
    (checkout / "docs" / "index.md").write_text("# pages, no block\n")
    assert load_script().main(["--demo", str(demo), "--root", str(checkout)]) == 0
    page = (checkout / "docs" / "builtin-world.md").read_text()
    assert "stale" not in page and "for its 2 steps" in page and "f00dfeedf00dfeed" in page
    out = capsys.readouterr().out
    assert "docs/builtin-world.md: rewrote demo-time" in out and "index.md" not in out


def test_every_block_of_the_checkout_is_found_once() -> None:
    """The README and docs pages of this checkout: each block the docs quote sits in exactly one page the script reads."""
    script = load_script()
    found: dict[str, list[str]] = {}
    for name in script.doc_files(script.ROOT):
        for match in script.BLOCK.finditer((script.ROOT / name).read_text(encoding="utf-8")):
            found.setdefault(match["name"], []).append(name)
    assert set(found) <= set(script.BLOCKS), found
    expected = {"demo-time", "demo-base", "demo-study", "quick-all", "world-spread", "registry-scenario"}
    assert expected <= set(found), f"blocks lost: {expected - set(found)}"
    assert all(len(pages) == 1 for pages in found.values()), found
    assert found["demo-time"] == ["README.md"]


def _speed_outputs(where: Path) -> Path:
    where.mkdir()
    (where / "study_speed.json").write_text(json.dumps({
        "benchmark": "study_speed", "measured": "2026-11-27 23:00 UTC", "cores": 2, "config": "configs/builtin-quick.yaml",
        "against": "dd9148c", "study_args": "--jobs 2 --threads all", "rounds": 2,
        "kinds": [{"kind": "world", "ratio": 1.01}, {"kind": "train", "ratio": 0.93}, {"kind": "eval", "ratio": 0.9},
                  {"kind": "wall (whole study)", "ratio": 0.87, "round_ratios": [0.85, 0.89]}],
        "runs": [{"label": "new", "wall": 400, "load": [0.5, 0.4, 0.3]}, {"label": "old", "wall": 460, "load": [1.2, 1, 1]}],
        "identical": True, "differences": []}))
    (where / "compute_floor.json").write_text(json.dumps({
        "benchmark": "compute_floor", "measured": "2026-11-27 23:30 UTC", "threads": 2, "sgemm_gflops": 190.0,
        "floor_ratio": 0.61, "kinds": {"world": {"kernel_share": 0.75, "matmul_gflops": 180.0},
                                       "eval": {"kernel_share": 0.4, "matmul_gflops": 60.0}}}))
    merge = {"method": "average", "mergekit_method": "linear", "ratio": {"median": 1.2, "min": 1.1, "max": 1.3},
             "cpu_ratio": {"median": 1.1}, "knowstack": {"peak_rss_per_checkpoint": 0.76},
             "mergekit": {"peak_rss_per_checkpoint": 1.72}, "max_abs_diff": 0.0, "entries_differing": 0, "entries": 10}
    (where / "merge.json").write_text(json.dumps({
        "benchmark": "merge", "date": "2026-11-27T22:43:22+00:00", "load_average_before": [4.2, 4, 4],
        "settings": {"models": 3, "parameters": 291021824, "repeats": 3}, "methods": [merge]}))
    ratio = {"median": 1.53, "min": 1.32, "max": 1.61}
    (where / "train_throughput.json").write_text(json.dumps({
        "benchmark": "train_throughput", "date": "2026-11-27T23:03:05+00:00", "model": {"params": 5310720},
        "data": {"examples": 192}, "recipe": {"batch": 16}, "repeats": 5, "load_average": {"before": [1.4, 2, 3]},
        "results": [{"finetune": "fft", "stronger_peer": "flattening", "ratio_vs_stronger_peer": ratio}]}))
    return where


def test_the_speed_block_reads_the_benchmarks_outputs(checkout: Path, tmp_path: Path) -> None:
    (checkout / "README.md").write_text("# p\n\n<!-- numbers:speed -->\nstale\n<!-- /numbers -->\n")
    assert load_script().main(["--speed", str(_speed_outputs(tmp_path / "bench")), "--root", str(checkout)]) == 0
    text = (checkout / "README.md").read_text()
    assert "stale" not in text and "each line is one run of one benchmark on this machine (its date at the end)" in text
    assert "0.87x the wall time of `dd9148c` (median of 2 alternating round(s), range 0.85-0.89" in text
    assert "with `--jobs 2 --threads all`" in text and "identical numbers" in text and "load average at each start 0.5, 1.2" in text
    assert "0.61 is spent in float32 matmul and attention kernels (world 75%, eval 40%" in text and "95% of this machine" in text
    assert ("merging 3 checkpoints of 291M parameters: average (mergekit `linear`) 1.20x mergekit's wall time [1.10-1.30] "
            "and 1.10x its CPU time, peak memory 0.76 checkpoints vs 1.72, largest output difference 0 (0 of 10") in text
    assert "FFT 1.53x the tokens per second of Trainer with its DataCollatorWithFlattening [1.32-1.61]" in text
    record = json.loads((tmp_path / "bench" / "study_speed.json").read_text())
    del record["config"], record["against"]  # as --table writes it
    assert "(config not recorded) with `--jobs 2 --threads all`: 0.87x the wall time of the earlier revision" in \
        load_script().study_speed_line(record)
    (tmp_path / "empty").mkdir()
    assert load_script().main(["--speed", str(tmp_path / "empty"), "--root", str(checkout)]) == 2


def test_a_benchmark_run_again_rewrites_its_own_speed_line_only(checkout: Path, tmp_path: Path) -> None:
    (checkout / "README.md").write_text("# p\n\n<!-- numbers:speed -->\nSpeed, as ratios:\n\n"
                                        "- the demo's study: 0.92x (`benchmarks/study_speed.py`, earlier)\n"
                                        "- merging: 9.99x (`benchmarks/merge.py`, earlier)\n"
                                        "- a line no benchmark names\n<!-- /numbers -->\n")
    every = _speed_outputs(tmp_path / "bench")
    (tmp_path / "merge-only").mkdir()
    shutil.copy(every / "merge.json", tmp_path / "merge-only" / "merge.json")
    assert load_script().main(["--speed", str(tmp_path / "merge-only"), "--root", str(checkout)]) == 0
    text = (checkout / "README.md").read_text()
    assert "- the demo's study: 0.92x (`benchmarks/study_speed.py`, earlier)" in text  # not run again: kept
    assert "9.99x" not in text and "average (mergekit `linear`) 1.20x mergekit's wall time" in text
    assert text.index("benchmarks/study_speed.py") < text.index("benchmarks/merge.py")  # the benchmarks' order
    assert "a line no benchmark names" not in text


def test_the_merge_benchmark_without_input_hashes_has_its_own_line(checkout: Path, tmp_path: Path) -> None:
    (checkout / "README.md").write_text("# p\n\n<!-- numbers:speed -->\nstale\n<!-- /numbers -->\n")
    bench = _speed_outputs(tmp_path / "bench")
    record = json.loads((bench / "merge.json").read_text())
    record["settings"]["knowstack_input_hashes"] = False
    record["methods"][0]["ratio"]["median"] = 0.95
    (bench / "merge-no-input-hashes.json").write_text(json.dumps(record))
    assert load_script().main(["--speed", str(bench), "--root", str(checkout)]) == 0
    text = (checkout / "README.md").read_text()
    hashed = next(line for line in text.splitlines() if "`benchmarks/merge.py`" in line)
    unhashed = next(line for line in text.splitlines() if "`benchmarks/merge.py --no-input-hashes`" in line)
    assert "1.20x mergekit's wall time" in hashed and "--no-input-hashes" not in hashed
    assert "(knowstack with --no-input-hashes)" in unhashed and "0.95x mergekit's wall time" in unhashed
    (bench / "merge.json").unlink()  # the one with hashes not run again: its line is kept
    assert load_script().main(["--speed", str(bench), "--root", str(checkout)]) == 0
    assert hashed in (checkout / "README.md").read_text()


def test_the_evaluation_benchmark_has_its_line(checkout: Path, tmp_path: Path) -> None:
    (checkout / "README.md").write_text("# p\n\n<!-- numbers:speed -->\nstale\n<!-- /numbers -->\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "eval_speed.json").write_text(json.dumps({
        "benchmark": "eval_speed", "measured": "2026-12-07 18:49 UTC", "config": "runs/demo/config.yaml",
        "against": "5c4275d", "rounds": 2, "ratio_of_medians": 1.2085, "round_ratios": [1.3606, 1.0413],
        "evaluations": 28, "loads": {"new": [[1.5, 1, 1], [2.0, 1, 1]], "old": [[2.1, 1, 1], [1.9, 1, 1]]},
        "identical": True, "differences": []}))
    assert load_script().main(["--speed", str(tmp_path / "bench"), "--root", str(checkout)]) == 0
    text = (checkout / "README.md").read_text()
    assert ("that study's 28 evaluations only (`runs/demo/config.yaml`; adapters of one base run on the base loaded "
            "once): 1.21x the wall time of `5c4275d` (median of 2 alternating round(s), rounds 1.36, 1.04), identical "
            "results; `benchmarks/eval_speed.py`, 2026-12-07 18:49 UTC, load average at each start 1.5, 2.1, 2.0, 1.9") \
        in text
    record = json.loads((tmp_path / "bench" / "eval_speed.json").read_text())
    (tmp_path / "bench" / "eval_speed.json").write_text(json.dumps({**record, "change": "finished rows leave"}))
    assert load_script().main(["--speed", str(tmp_path / "bench"), "--root", str(checkout)]) == 0
    assert "only (`runs/demo/config.yaml`; finished rows leave): 1.21x" in (checkout / "README.md").read_text()


def test_the_families_block_is_the_test_runs_matrix(checkout: Path, tmp_path: Path) -> None:
    """docs/families.md's table from the JSON tests/test_families.py writes: a cell per outcome, refusals explained."""
    record = {"features": ["train-fft", "moe-fft", "compose"], "date": "2026-12-07", "transformers": "5.25.0",
              "families": {
                  "qwen3": {"model_type": "qwen3", "tied": True, "train-fft": {"outcome": "works", "class": "Qwen3ForCausalLM"},
                            "moe-fft": {"outcome": "works", "class": "Qwen3MoeForCausalLM"},
                            "compose": {"outcome": "works"}},
                  "phi3": {"model_type": "phi3", "tied": False, "train-fft": {"outcome": "failed", "error": "boom"},
                           "moe-fft": {"outcome": "refused", "reason": "no MoE class fits phi3"}}}}
    (checkout / "docs" / "families.md").write_text("# f\n\n<!-- numbers:families -->\nold\n<!-- /numbers -->\n")
    (tmp_path / "families.json").write_text(json.dumps(record))
    assert load_script().main(["--families", str(tmp_path / "families.json"), "--root", str(checkout)]) == 0
    page = (checkout / "docs" / "families.md").read_text()
    assert "| qwen3 | qwen3 | yes | yes (Qwen3ForCausalLM) | yes (Qwen3MoeForCausalLM) | yes |" in page
    assert "| phi3 | phi3 | no | **fails** | refused before any compute | not run |" in page
    assert "FFT-MoE: no MoE class fits phi3" in page and "fused qkv_proj and gate_up_proj" in page
    assert "old" not in page
    assert load_script().main(["--families", str(tmp_path / "missing.json"), "--root", str(checkout)]) == 2


def test_the_kernel_spread_block_reads_the_kernel_paths_measurement(checkout: Path, tmp_path: Path) -> None:
    """docs/builtin-world.md's table from scripts/kernel_paths.py's JSON: a row per kernel path, a column per thread
    count, which paths the thread count changes, and the speed of MKL's strict mode against its default."""
    def build(mkl: str, torch_path: str, threads: int, fingerprint: str) -> dict:
        return {"mkl": mkl, "torch": torch_path, "threads": threads, "fingerprint": fingerprint,
                "environment": {"torch_cpu_capability": "AVX2" if "avx2" in torch_path else "AVX512"}}

    record = {"machine": {"cpu": "AMD EPYC", "cores": 2, "python": "3.11.7", "torch": "2.13.0+cpu", "preset": "test",
                          "date": "2026-12-07"},
              "builds": [build("MKL default", "default", 1, "aaaa"), build("MKL default", "default", 2, "bbbb"),
                         build("AVX2,STRICT", "default", 1, "cccc"), build("AVX2,STRICT", "default", 2, "cccc"),
                         build("AVX2,STRICT", "ATen avx2", 1, "dddd"), build("AVX2,STRICT", "ATen avx2", 2, "dddd")],
              "speed": [{"mkl": mkl, "threads": 2, "seconds_per_step": seconds}
                        for mkl, seconds in (("MKL default", 0.1), ("AVX2,STRICT", 0.12), ("MKL default", 0.3),
                                             ("AVX2,STRICT", 0.11), ("MKL default", 0.1), ("AVX2,STRICT", 0.13))]}
    (tmp_path / "paths.json").write_text(json.dumps(record))
    (checkout / "docs" / "builtin-world.md").write_text("# w\n\n<!-- numbers:kernel-spread -->\nold\n<!-- /numbers -->\n")
    record["machine"]["preset"], record["builds"], record["speed"] = "quick", record["builds"][2:4], []
    (tmp_path / "quick.json").write_text(json.dumps(record))
    assert load_script().main(["--kernel-paths", str(tmp_path / "paths.json"), str(tmp_path / "quick.json"),
                               "--root", str(checkout)]) == 0
    page = (checkout / "docs" / "builtin-world.md").read_text()
    assert "old" not in page and "AMD EPYC, 2 cores" in page and "on 2026-12-07" in page
    assert "| MKL default | default | AVX512 | `aaaa` | `bbbb` |" in page
    assert "| AVX2,STRICT | ATen avx2 | AVX2 | `dddd` | `dddd` |" in page
    assert "4 distinct fingerprint(s) in 6 builds; the thread count changes the world on: MKL default / default" in page
    assert "ATen's ISA changes the world under every MKL_CBWR" in page
    assert "2 threads: 100 ms [100-300] with MKL's default, 120 ms [110-130] with AVX2,STRICT (1.20x)" in page
    assert "median [range] of 3" in page
    assert "The built-in world `quick` built on one machine" in page  # the second file's table
    assert "1 distinct fingerprint(s) in 2 builds; every kernel path gives one world on every thread count built." in page
