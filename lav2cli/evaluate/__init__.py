"""Evaluation: `lav2 eval vqa | caption | mme | text`.

- :mod:`lav2cli.evaluate.metrics`: pure-Python, importable metrics (VQA accuracy and answer
  normalisation, COCO BLEU-1..4 and CIDEr-D, the MME parser and scores).
- :mod:`lav2cli.evaluate.tasks`: which records each task scores and how.
- :mod:`lav2cli.evaluate.runner`: batched greedy generation through the answer pipeline
  (:mod:`lav2cli.answer`) with resumable JSON-lines predictions, the text task's losses, the
  metrics file and the tables.

    from lav2cli.evaluate import EvalOptions, evaluate
    result = evaluate(EvalOptions("vqa", data=Path("data/easyvqa/records.jsonl"), model="runs/joint",
                                  out=Path("runs/joint/easyvqa.jsonl")))
    print(result["accuracy"])
"""

from lav2cli.evaluate.runner import EvalOptions, evaluate, metrics_path, read_predictions, run

__all__ = ["EvalOptions", "evaluate", "metrics_path", "read_predictions", "run"]
