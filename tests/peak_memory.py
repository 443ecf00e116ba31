"""Peak resident memory of one train() call of a small Llama, next to the estimate (study/resources.py).

Run in a fresh process (tests/test_resources.py does): python tests/peak_memory.py fft|lora OUT_DIR
Prints one JSON line: the measured increase of resident memory over the call (sampled every 2 ms) and
the estimate's parts, in bytes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil
from conftest import build_tiny_tokenizer

from knowstack.builtin.pretrain import ModelShape, make_model
from knowstack.config import parse_config
from knowstack.data.formats import Example
from knowstack.study.resources import _from_hf_config, train_estimate
from knowstack.train import TrainSettings, train

SHAPE = ModelShape(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, context=512)
TRAINING = {"lr": 1e-4, "batch_size": 8, "micro_batch_size": 8, "max_length": 256, "epochs": 1}
TEXT = "The official currency of Japan is the yen. France is in Europe. " * 40


def main(finetune: str, out: Path) -> dict[str, int]:
    tokenizer = build_tiny_tokenizer()
    model = make_model(tokenizer, SHAPE, 0)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    arch = _from_hf_config(model.config)
    del model
    # long prompts: each is cut in its middle to max_length, so every packed row is full, as the estimate assumes
    examples = [Example(f"Q{i}: " + TEXT[:900], " A: " + TEXT[:200]) for i in range(16)]
    config = parse_config({"name": "peak", "base": {"builtin": "test"},
                           "training": {**TRAINING, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}})
    settings = TrainSettings(finetune=finetune, lora_dropout=0.0, **TRAINING)
    import peft  # noqa: F401  (imported before the baseline: modules are not training memory)

    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    train(out / "base", examples, out / finetune, settings)
    done.set()
    sampler.join()
    estimate = train_estimate(arch, config, finetune)
    return {"measured": peak[0] - before, "estimate": estimate.total, "weights": estimate.weights,
            "grads": estimate.grads, "optimizer": estimate.optimizer, "activations": estimate.activations}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
