"""`rollscan demo`: the main job on the embedded default, on this machine alone.

For now it trains a model on synthetic fabric within a time budget and evaluates it on held-out
synthetic tiles with planted defects; the pipeline issue extends it to a whole roll.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from distill.data.synthetic import write_category
from distill.evaluate import evaluate, format_table
from distill.train import TrainConfig, train


def run_demo(
    workdir: Path,
    *,
    minutes: float = 2.5,
    json_out: Path | None = None,
    teacher_weights: str | None = None,
) -> dict:
    started = time.perf_counter()
    data = workdir / "synthetic-twill"
    print(f"making synthetic fabric in {data} …")
    write_category(data, n_train=60, n_test_good=30, n_test_defect=30, weave="twill", seed=7)
    model = workdir / "model.pt"
    print(f"training for at most {minutes} min on the CPU (default teacher, official recipe) …")
    config = TrainConfig(teacher_weights=teacher_weights, max_minutes=minutes, epochs=100)
    card = train(data, model, config)
    print(f"model saved to {model}; threshold {card.threshold:.4f}")
    result = evaluate(model, data, batch_size=8, report_dir=workdir / "report")
    print(format_table({"synthetic twill": result}))
    print(f"report (ROC curves, best and worst tiles): {workdir / 'report'}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result
