"""The console scripts as a user runs them: ``qat-train`` (runs, sweeps, launchers, bad
configs) and ``qat-report``."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from app_helpers import SWEEP_TINY, job_results, offline_runs, run_cli, wandb_records

from qat_lightning.app.config import register_configs
from qat_lightning.app.main import config_dir, preflight

pytestmark = pytest.mark.slow


BAD_CONFIGS = [
    (["quant.params.bits=1"], "quant.params.bits=1 is invalid: allowed an integer in 2..16"),
    (["quant.inputs.observer=maxmin"], "quant.inputs.observer=maxmin is invalid: allowed one"),
    (["model=resnet999"], "model=resnet999 is invalid: allowed one of cnn, mobilenet_v2"),
    (["quant.params.bitz=4"], "quant.params.bitz is not a key of quant.params: allowed bits"),
    (["data=cifar10", "data.root=no/such/dir"], "data.root=no/such/dir is invalid (no such"),
    (["-m", "quant.params.bits=4,1"], "quant.params.bits=1 is invalid: allowed an integer"),
]


@pytest.mark.parametrize("args, expected", [BAD_CONFIGS[0], BAD_CONFIGS[-1]])
def test_a_bad_config_fails_before_training_with_one_line(tmp_path, args, expected):
    done = run_cli("qat-train", args, tmp_path, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qat-train: error: {expected}")
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("args, expected", BAD_CONFIGS)
def test_every_bad_config_is_one_line_from_the_checks_qat_train_runs_first(args, expected, capsys):
    # The same check as above in this process (each console-script start costs ~10 s of
    # imports): `preflight` is what `qat-train` runs before Hydra starts any job.
    register_configs()
    with pytest.raises(SystemExit) as exit_info:
        preflight(args, config_dir())
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qat-train: error: {expected}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 2-job multirun with the basic launcher, logged to wandb offline."""
    cwd = tmp_path_factory.mktemp("sweep")
    done = run_cli(
        "qat-train",
        ["-m", *SWEEP_TINY, "logger=wandb", "quant.params.bits=4,8", "hydra.sweep.dir=sweeps/bits"],
        cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, cwd / "sweeps" / "bits"


def test_multirun_leaves_one_result_per_job(sweep):
    _, sweep_dir = sweep
    results = job_results(sweep_dir)
    assert [r["config"]["quant"]["params"]["bits"] for r in results] == [4, 8]
    assert [r["job_num"] for r in results] == [0, 1]
    for r in results:
        assert r["onnx_accuracy"] is not None and r["export_paths"]["onnx"].endswith(".onnx")
        assert "quant.params.bits=" + str(r["config"]["quant"]["params"]["bits"]) in r["overrides"]
    # 4-bit weights are stored smaller than 8-bit ones
    assert results[0]["sizes"]["native_bytes"] < results[1]["sizes"]["native_bytes"]


def test_multirun_wandb_runs_share_the_sweep_group(sweep):
    cwd, _ = sweep
    runs = offline_runs(cwd / "wandb_dir")
    assert len(runs) == 2
    groups, names = set(), set()
    for path in runs:
        (run,) = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
        groups.add(run.run_group)
        names.add(run.display_name)
    assert groups == {"sweeps_bits"}
    # each run is named by its job's overrides
    assert [sum(f"quant.params.bits={b}" in n for n in names) for b in (4, 8)] == [1, 1]


def test_report_summarises_a_real_sweep(sweep):
    cwd, sweep_dir = sweep
    done = run_cli("qat-report", [str(sweep_dir)], cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["params_bits"]) for r in rows] == [4, 8]
    results = job_results(sweep_dir)
    assert [float(r["onnx_accuracy"]) for r in rows] == [
        round(r["onnx_accuracy"], 4) for r in results
    ]
    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.splitlines()[0].startswith("| job | model | data | inputs_bits | params_bits")
    assert [line.split(" | ")[4] for line in markdown.splitlines()[2:4]] == ["4", "8"]
    assert markdown.strip() in done.stdout
    png = (sweep_dir / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_of_a_directory_without_results_is_one_line(tmp_path):
    done = run_cli("qat-report", [str(tmp_path)], tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "holds no results.json" in done.stderr


@pytest.mark.parametrize(
    "launcher, plugin, extra",
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher", ["hydra.launcher.n_jobs=2"]),
        (
            "submitit_local",
            "hydra_plugins.hydra_submitit_launcher",
            ["hydra.launcher.timeout_min=10"],
        ),
    ],
)
def test_launcher_runs_a_two_job_sweep(tmp_path, launcher, plugin, extra):
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed (pip install 'qat_lightning[launchers]')")
    done = run_cli(
        "qat-train",
        [
            "-m",
            *SWEEP_TINY,
            f"hydra/launcher={launcher}",
            *extra,
            "quant.inputs.bits=4,8",
            "hydra.sweep.dir=sweep",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = job_results(tmp_path / "sweep")
    assert sorted(r["config"]["quant"]["inputs"]["bits"] for r in results) == [4, 8]
    assert all(json.dumps(r["onnx_accuracy"]) != "null" for r in results)
