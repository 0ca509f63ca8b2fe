"""The fraud-detection pipeline built in Python with the SDK, and run on a mesh.

    tether dev &                      # or any running mesh; TETHER_CONTROLLER points at it
    python examples/fraud_detection.py

The task code is the same as in fraud_detection.yaml, loaded from there so the two cannot
drift apart; the DAG, resources and policies are declared here in Python.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tether.sdk import Client, Workflow

HERE = Path(__file__).parent


def build() -> Workflow:
    """The pipeline: collect -> features -> train -> detect (which also reads features)."""
    code = {
        t["name"]: t["command"]
        for t in yaml.safe_load((HERE / "fraud_detection.yaml").read_text())["tasks"]
    }
    image = "python:3.12-slim"
    wf = Workflow("fraud-detection")
    collect = wf.task(
        "collect",
        code["collect"],
        image=image,
        cpu=0.5,
        memory="128Mi",
        timeout="60s",
        env={"SEED": "7"},
    )
    features = wf.task(
        "features",
        code["features"],
        image=image,
        depends_on=[collect],
        cpu=0.5,
        memory="128Mi",
        retries=1,
        timeout="60s",
    )
    train = wf.task(
        "train",
        code["train"],
        image=image,
        depends_on=[features],
        cpu=1,
        memory="256Mi",
        timeout="120s",
    )
    wf.task(
        "detect",
        code["detect"],
        image=image,
        depends_on=[features, train],
        cpu=0.5,
        memory="128Mi",
        timeout="60s",
    )
    return wf


def main() -> None:
    with Client() as client:
        run = client.submit(build())
        print(f"run {run.id}")
        final = run.wait(timeout=300)
        detect = next(t for t in final.tasks if t.spec.name == "detect")
        print(detect.stdout_tail)


if __name__ == "__main__":
    main()
