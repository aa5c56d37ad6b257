"""`python -m sfseg.gpu_check`: every stage runs and reports at toy sizes on the CPU; without CUDA it says
so; a stage that fails or hangs is reported, cut off, and the others still run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sfseg
from sfseg.bench.compile_check import TOY
from sfseg.gpu_check import runner
from sfseg.gpu_check.__main__ import main
from sfseg.gpu_check.runner import environment, run_checks
from sfseg.gpu_check.sizes import STAGE_LIMITS_S
from sfseg.gpu_check.stages import PAPER_TABLE5
from sfseg.models import CONTEXT_MODULES
from tests.test_reproducibility import ENV


def numbers(value: object) -> list[float]:
    """Every int and float anywhere in a JSON value."""
    if isinstance(value, dict):
        return [number for item in value.values() for number in numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in numbers(item)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_tiny_check_runs_every_stage_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    command = [sys.executable, "-m", "sfseg.gpu_check", "--device", "cpu", "--tiny", "--out", str(out)]
    # A busy 2-core CI machine is slow at toy sizes; the budget is not what this test checks.
    done = subprocess.run(
        [*command, "--minutes", "30"], env=ENV, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["tiny"] is True
    stages = {stage["name"]: stage for stage in report["stages"]}
    assert list(stages) == list(STAGE_LIMITS_S)
    for name, stage in stages.items():
        assert stage["status"] == "passed", (name, stage.get("problems"), stage.get("error"))
        assert Path(stage["log"]).is_file()
    assert all(math.isfinite(number) for number in numbers(report))

    env = stages["environment"]["result"]
    assert env["packages"]["torch"] == torch.__version__ and "gpu" not in env

    smoke = stages["smoke"]["result"]["cases"]
    assert sorted((case["context"], case["levels"]) for case in smoke) == sorted(
        (context, levels) for context in CONTEXT_MODULES for levels in (1, 4)
    )
    for case in smoke:
        assert case["loss_finite"] and case["gradients_finite"]
        assert (
            case["float32"]["agrees"] and case["bfloat16"]["agrees"] and case["float32"]["level_maps_equal"]
        )

    rows = stages["table5"]["result"]["rows"]
    fcn = next(row for row in rows if row["variant"] == "fcn")
    assert fcn["latency_ratio"] == fcn["paper_time_ratio"] == 1.0
    sf_dense = next(row for row in rows if row["variant"] == "sf_c2f" and row["path"] == "dense")
    fps, its, memory = PAPER_TABLE5["sf_c2f"]
    assert sf_dense["paper_time_ratio"] == pytest.approx(PAPER_TABLE5["fcn"][0] / fps)
    assert sf_dense["paper_train_ratio"] == pytest.approx(PAPER_TABLE5["fcn"][1] / its)
    assert sf_dense["paper_memory_ratio"] == pytest.approx(memory / PAPER_TABLE5["fcn"][2])
    assert sf_dense["train_step_ratio"] > 0
    assert any(row["variant"] == "sf_c2f" and row["path"] == "sparse" for row in rows)
    assert (out / "table5" / "results.md").is_file()

    training = stages["training"]["result"]
    assert training["steps"] == 4 and training["precision"] == "bf16-mixed"
    assert training["images_per_s"] > 0 and 0 <= training["data_share"] < 1 and training["peak_memory_mb"] > 0
    steps = json.loads((out / "training" / "step_times.json").read_text())["steps"]
    # 4 steps: the loss at the start and the end are those of one step each.
    assert (steps[0]["loss"], steps[-1]["loss"]) == (training["loss_start"], training["loss_end"])

    compiled = stages["compile"]["result"]
    assert compiled["backbone"] == "local" and compiled["precision"] == "float32"
    settings = {row["setting"]: row for row in compiled["rows"]}
    assert list(settings) == list(TOY.settings)
    assert all(value == 1.0 for key, value in settings["eager"].items() if key.endswith("_ratio"))
    for row in settings.values():
        assert row["agrees_dense"]["agrees"] and row["agrees_sparse"]["agrees"], row
        assert row["train_step_ratio"] == pytest.approx(
            row["train_step_ms"] / settings["eager"]["train_step_ms"]
        )
        assert min(row["train_step_first_s"], row["dense_first_s"], row["sparse_first_s"]) > 0
    assert (out / "compile" / "results.md").is_file()

    mechanism = stages["mechanism"]["result"]
    assert mechanism["seeds"] == "0" and mechanism["steps"] == 2 and len(mechanism["goals"]) == 3
    assert Path(mechanism["report"]).is_file()

    markdown = (out / "report.md").read_text()
    assert "**6 of 6 stages passed.**" in markdown
    for name in STAGE_LIMITS_S:
        assert f"| {name} | passed |" in markdown
    assert "| anl_multi | 4 |" in markdown and "| sf_c2f | sparse |" in markdown
    assert "| compile |" in markdown
    assert "### Goals" in markdown  # the mechanism report, embedded


def test_without_cuda_it_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "sfseg.gpu_check", "--out", str(tmp_path / "check")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no CUDA device is available here" in done.stderr and "--device cpu --tiny" in done.stderr
    assert not (tmp_path / "check").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cpu"], "--device cpu runs only with --tiny"),
        (["--device", "cpu", "--tiny", "--minutes", "0"], "--minutes 0: give a positive number"),
    ],
)
def test_refuses_full_sizes_on_the_cpu_and_no_time(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# Stands in for `python -m sfseg.gpu_check --stage NAME ...`: smoke fails as on a node without hydra,
# table5 hangs (with a child of its own), the others pass at once.
FAKE_STAGE = """
import json, subprocess, sys, time
args = sys.argv[1:]
stage, result = args[args.index("--stage") + 1], args[args.index("--stage-result") + 1]
if stage == "smoke":
    import hydra_is_not_installed_here as hydra
if stage == "table5":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(300)
json.dump({"result": None, "problems": []}, open(result, "w"))
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_failing_or_hanging_stage_is_reported_and_the_rest_still_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "MIN_STAGE_S", 1)
    pid_file = tmp_path / "grandchild.pid"
    fake = [sys.executable, "-c", FAKE_STAGE, str(pid_file)]
    # 3 s in all: environment and smoke end at once, table5 hangs until the budget runs out.
    outcomes = run_checks(tmp_path, "cpu", True, 0.05, "python -m sfseg.gpu_check (fake stages)", fake)

    statuses = {outcome["name"]: outcome["status"] for outcome in outcomes}
    assert statuses == {
        "environment": "passed",
        "smoke": "failed",
        "table5": "timed out",
        "training": "skipped",
        "compile": "skipped",
        "mechanism": "skipped",
    }
    assert not alive(int(pid_file.read_text()))  # the hanging stage's own child was stopped too
    report = json.loads((tmp_path / "report.json").read_text())
    assert [stage["status"] for stage in report["stages"]] == list(statuses.values())
    markdown = (tmp_path / "report.md").read_text()
    assert "**1 of 6 stages passed.**" in markdown
    (smoke,) = [outcome for outcome in outcomes if outcome["name"] == "smoke"]
    assert smoke["problems"] == [f"cannot import hydra_is_not_installed_here: {runner.INSTALL_HINT}"]
    assert "ModuleNotFoundError" in smoke["error"] and "ModuleNotFoundError" in markdown
    assert "| table5 | timed out |" in markdown and "left of --minutes 0.05" in markdown


def test_the_environment_names_what_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(runner, "STACK", {"torch": "torch", "no-such-package": "sfseg_no_such_module"})
    result, problems = environment("cpu")
    assert result["packages"] == {"torch": torch.__version__, "no-such-package": None}
    assert len(problems) == 1 and "no-such-package" in problems[0] and "wheelhouse" in problems[0]


def test_stages_see_this_sfseg_first() -> None:
    source = str(Path(sfseg.__file__).resolve().parents[1])
    path = runner.child_environment()["PYTHONPATH"].split(os.pathsep)
    assert path[0] == source
