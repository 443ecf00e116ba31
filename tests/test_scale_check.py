"""benchmarks/scale_check.py (the GPU scale check) run whole with --tiny on the CPU: every figure of its JSON is
there, or says it needs a GPU; scripts/docs_numbers.py --scale renders it, and a GPU run's figures too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "scale_check.py"
NOT_MEASURED = "not measured (no GPU)"


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return load_script(CHECK, "scale_check_helpers")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One --tiny run, in its own process as on a GPU machine (~30 s on 2 busy cores)."""
    out = tmp_path_factory.mktemp("scale") / "scale-check.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(CHECK), "--tiny", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "knowstack / Trainer" in done.stdout and "knowstack / HF generate" in done.stdout
    return out


def test_the_tiny_run_records_every_figure_or_why_not(tiny_report: Path) -> None:
    report = json.loads(tiny_report.read_text())
    assert report["benchmark"] == "scale_check" and report["preset"] == "tiny"
    assert report["device"]["cuda"] is False and report["device"]["peak_bf16_tflops"] == NOT_MEASURED
    assert report["data"]["examples"] == 8 and report["data"]["prompt_tokens"][0] <= report["data"]["prompt_tokens"][2]
    assert [case["name"] for case in report["train"]] == ["Llama-3.2-1B FFT", "Llama-3-8B LoRA"]
    for case in report["train"]:
        ours, peers = case["knowstack"], case["peers"]
        assert set(peers) == {"padded", "flattening"}  # the bf16-base peer runs on a GPU only
        for run in (ours, *peers.values()):
            assert run["tokens_per_second"] > 0 and len(run["step_seconds"]) == 2  # 1 warm-up + 1 timed
            assert run["mfu"] == NOT_MEASURED and run["peak_gpu_memory_gib"] == NOT_MEASURED
            # every side trains on the same examples in the same steps: Trainer's seeded sampler draws knowstack's order
            assert run["tokens"] == ours["tokens"]
        stronger = max(peers[kind]["tokens_per_second"] for kind in ("padded", "flattening"))
        assert case["ratio_vs_stronger_peer"] == pytest.approx(ours["tokens_per_second"] / stronger)
        assert peers[case["stronger_peer"]]["tokens_per_second"] == stronger
        estimate = case["estimate"]
        assert estimate["params"] == case["params"]  # the dry run counts the model that was built
        assert estimate["gib"] > 0 and 0 < estimate["at_longest_row_gib"] <= estimate["gib"]
        assert estimate["longest_row_tokens"] == case["longest_row_tokens"] <= estimate["tokens_per_row"]
        assert "measured_over_estimate" not in estimate  # no GPU, no measured peak
    fft, lora = report["train"]
    assert fft["flops_per_token"] == 6 * fft["params"] and fft["trainable"] == fft["params"]
    assert lora["flops_per_token"] == 4 * lora["params"] + 6 * lora["trainable"] and lora["trainable"] < lora["params"]
    gen = report["generation"]
    assert gen["paper_budget"] == 512 and gen["max_new_tokens"] == 4
    for side in ("knowstack", "hf_generate"):
        assert 0 < gen[side]["tokens"] <= gen["prompts"] * gen["max_new_tokens"]
    assert gen["ratio"] == pytest.approx(gen["knowstack"]["tokens_per_second"] / gen["hf_generate"]["tokens_per_second"])
    assert gen["knowstack"]["row_tokens"] > 0 and gen["knowstack"]["row_tokens_saved"] >= 0
    merge = report["merge"]
    assert merge["models"] == 3 and merge["layers"] == merge["of_layers"] == 2 and merge["dtype"] == "bfloat16"
    assert merge["knowstack"]["wall_s"] > 0 and merge["knowstack"]["peak_rss_per_checkpoint"] > 0
    assert merge["mergekit"] == "not installed" or merge["mergekit"]["wall_s"] > 0


def test_docs_numbers_renders_the_tiny_run(tiny_report: Path, tmp_path: Path) -> None:
    docs = load_script(ROOT / "scripts" / "docs_numbers.py")
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("# p\n")
    (root / "docs" / "speed.md").write_text("# speed\n\n<!-- numbers:scale -->\nnot yet\n<!-- /numbers -->\n")
    assert docs.main(["--scale", str(tiny_report), "--root", str(root)]) == 0
    block = (root / "docs" / "speed.md").read_text()
    assert "not yet" not in block and "the tiny preset on the CPU" in block
    assert "| Llama-3.2-1B FFT (" in block and "| Llama-3-8B LoRA (" in block and "MFU not measured (no GPU)" in block
    assert "HF `generate`" in block and "average of 3 x Llama-3-8B" in block
    assert docs.main(["--scale", str(tiny_report), "--root", str(root), "--check"]) == 0


def _gpu_record() -> dict:
    """A GPU run's JSON as scale_check.py writes it (figures invented, shapes real)."""
    def run(tps: float, mfu: float, peak: float) -> dict:
        return {"tokens": 80000, "seconds": 80000 / tps, "tokens_per_second": tps, "mfu": mfu, "step_seconds": [1.0],
                "peak_gpu_memory_gib": peak}

    estimate = {"gib": 120.0, "gpus": 2, "at_longest_row_gib": 40.0, "longest_row_tokens": 7012, "params": 1235814400,
                "tokens_per_row": 32768}
    fft = {"name": "Llama-3.2-1B FFT", "model": "Llama-3.2-1B", "finetune": "fft", "micro": 16, "batch": 16,
           "timed_steps": 6, "params": 1235814400, "trainable": 1235814400, "weights": "float32 master weights, bf16 "
           "autocast", "flops_formula": "6 x parameters per token (forward 2N, backward 4N)",
           "knowstack": run(30000.0, 0.225, 32.0), "peers": {"padded": run(12000.0, 0.09, 50.0),
                                                             "flattening": run(20000.0, 0.15, 35.0)},
           "stronger_peer": "flattening", "ratio_vs_stronger_peer": 1.5, "estimate": estimate}
    lora = {"name": "Llama-3-8B LoRA", "model": "Llama-3-8B", "finetune": "lora", "micro": 4, "batch": 16,
            "timed_steps": 6, "params": 8030261248, "trainable": 20971520, "weights": "float32 master weights, bf16 "
            "autocast", "flops_formula": "4 x parameters + 6 x adapter parameters per token",
            "knowstack": {"error": "OutOfMemoryError: CUDA out of memory"},
            "peers": {"padded": run(5000.0, 0.16, 70.0), "flattening": run(6000.0, 0.2, 60.0),
                      "flattening, bf16 base": run(7000.0, 0.23, 40.0)}, "estimate": {"error": "RuntimeError: x"}}
    return {"benchmark": "scale_check", "date": "2026-12-08T10:00:00+00:00", "preset": "gpu", "commit": "abc1234",
            "device": {"name": "NVIDIA H100 80GB HBM3", "peak_bf16_tflops": 989.0, "torch": "2.11.0+cu130",
                       "transformers": "5.25.0", "peft": "0.21.2"},
            "train": [fft, lora],
            "generation": {"model": "Llama-3-8B", "dtype": "bfloat16", "prompts": 32, "batch": 32, "max_new_tokens": 512,
                           "paper_budget": 512, "knowstack": {"tokens_per_second": 1200.0, "row_tokens": 12000,
                                                              "row_tokens_saved": 4000},
                           "hf_generate": {"tokens_per_second": 1000.0}, "ratio": 1.2, "same_outputs": 30},
            "merge": {"models": 3, "model": "Llama-3-8B", "params": 8030261248, "checkpoint_gb": 16.06,
                      "variant": "full size, inputs in RAM (/dev/shm)",
                      "knowstack": {"wall_s": 60.0, "cpu_s": 90.0, "peak_rss_per_checkpoint": 0.8},
                      "mergekit": {"wall_s": 50.0, "cpu_s": 70.0, "peak_rss_per_checkpoint": 1.5},
                      "ratio_vs_mergekit": 1.2}}


def test_docs_numbers_renders_a_gpu_run_and_its_failures(tmp_path: Path) -> None:
    docs = load_script(ROOT / "scripts" / "docs_numbers.py")
    path = tmp_path / "scale-check.json"
    path.write_text(json.dumps(_gpu_record()))
    text = docs.scale(path)
    assert "NVIDIA H100 80GB HBM3 (dense bf16 peak 989 TFLOP/s), 2026-12-08 10:00 UTC, commit `abc1234`" in text
    fft_row = next(line for line in text.splitlines() if line.startswith("| Llama-3.2-1B FFT"))
    assert "1.24B parameters, 16 examples a step, micro-batch 16, 6 timed steps" in fft_row
    assert "30,000 tokens/s, MFU 22%" in fft_row and "20,000 tokens/s, MFU 15%" in fft_row and "**1.50x**" in fft_row
    assert "32.0 GiB | 120.0 GiB (0.27x); 40.0 GiB at the longest row (7,012 tokens) (0.80x)" in fft_row
    lora_row = next(line for line in text.splitlines() if line.startswith("| Llama-3-8B LoRA"))
    assert "failed (OutOfMemoryError: CUDA out of memory)" in lora_row
    assert "Llama-3-8B LoRA, HF Trainer + PEFT flattening, bf16 base: 7,000 tokens/s, MFU 23%, peak GPU memory 40.0" in text
    assert ("knowstack 1,200 new tokens/s, HF `generate` 1,000: **1.20x**; 30 of 32 outputs identical; finished rows "
            "left the batch: 25% of the row-tokens not computed") in text
    assert "knowstack 60.0 s wall (90.0 s CPU, peak memory 0.80 checkpoints)" in text and "**1.20x** mergekit's" in text


def test_docs_numbers_refuses_a_missing_file_or_another_benchmarks_json(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    docs = load_script(ROOT / "scripts" / "docs_numbers.py")
    (tmp_path / "README.md").write_text("<!-- numbers:scale -->\nx\n<!-- /numbers -->\n")
    assert docs.main(["--scale", str(tmp_path / "none.json"), "--root", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "merge.json"
    other.write_text(json.dumps({"benchmark": "merge"}))
    assert docs.main(["--scale", str(other), "--root", str(tmp_path)]) == 2
    assert "not a scale check's output" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "<!-- numbers:scale -->\nx\n<!-- /numbers -->\n"


def test_the_bf16_peak_is_the_devices(check: ModuleType) -> None:
    assert check.bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert check.bf16_peak("NVIDIA H100 PCIe") == 756.0 and check.bf16_peak("NVIDIA H100 NVL") == 835.0
    assert check.bf16_peak("NVIDIA H200") == 989.0 and check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert check.bf16_peak("Some Future GPU") == "unknown for Some Future GPU"


def test_the_merge_goes_where_three_checkpoints_fit_or_gets_lighter(check: ModuleType, tmp_path: Path) -> None:
    shm, disk = tmp_path / "shm", tmp_path / "disk"
    gb = 10**9

    def layout(shm_free: int, disk_free: int, models: int = 3) -> tuple[int, Path, Path]:
        free = {shm: shm_free, disk: disk_free}
        return check.merge_layout(32, lambda layers: layers * gb // 2, models, [shm, disk], disk,  # 16 GB at 32
                                  free=free.__getitem__, same=lambda a, b: a == b)

    assert layout(64 * gb, 40 * gb) == (32, shm, disk)  # inputs in RAM, the output on disk
    assert layout(10 * gb, 80 * gb) == (32, disk, disk)  # the disk holds all four
    assert layout(70 * gb, 5 * gb) == (32, shm, shm)  # RAM holds all four
    kept, inputs, out = layout(40 * gb, 20 * gb)  # neither holds three 16 GB inputs: fewer layers
    assert kept < 32 and (inputs, out) == (shm, disk) and 3 * kept * gb // 2 * 1.05 <= 40 * gb
    with pytest.raises(RuntimeError, match="not even one layer"):
        layout(0, 0)


def test_generated_tokens_stop_at_the_first_eos(check: ModuleType) -> None:
    rows = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert check.generated_tokens(rows, eos=2) == 3 + 5 + 1
    assert check.generated_tokens(rows, eos=None) == 15


def test_without_a_gpu_only_tiny_runs(check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        check.parse_args([])
    with pytest.raises(SystemExit):
        check.parse_args(["--tiny", "--parts", "train,bake"])
    args = check.parse_args(["--tiny", "--steps", "3"])
    assert args.preset.steps == 3 and args.preset.batch == check.TINY.batch and args.part_names == ["train", "generate",
                                                                                                       "merge"]


def test_a_failed_measurement_is_recorded_and_the_check_goes_on(check: ModuleType,
                                                                capsys: pytest.CaptureFixture) -> None:
    def out_of_memory() -> tuple[dict, None]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert check.attempt(out_of_memory, "Trainer padded") == (
        {"error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}, None)
    assert "Trainer padded: FAILED (OutOfMemoryError" in capsys.readouterr().out
    assert check.attempt(lambda: ({"tokens": 1}, "facts"), "x") == ({"tokens": 1}, "facts")
