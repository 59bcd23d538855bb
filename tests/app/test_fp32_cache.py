"""The fp32 checkpoint cache: runs with the same float config train the float model once."""

from __future__ import annotations

import csv
import logging
import threading
import time

import pytest
import torch
from app_helpers import TINY, compose_config
from torch import nn

from qat_lightning.app.fp32_cache import Fp32Cache, fp32_key
from qat_lightning.app.train import train


def key(*overrides: str) -> dict:
    return fp32_key(compose_config(list(overrides)))


def test_the_key_holds_what_determines_the_float_weights_and_nothing_else():
    base = key()
    for change in ("seed=1", "model=resnet20", "fp32_epochs=3", "optim.lr=0.1", "data.seed=2"):
        assert key(change) != base, change
    for same in ("quant.params.bits=4", "optim.qat_lr=0.5", "qat_epochs=5", "data.num_workers=2"):
        assert key(same) == base, same


def test_a_second_job_waits_for_the_first_and_reuses_its_weights(tmp_path):
    """Two jobs of a joblib sweep: the lock makes the second wait, then it loads, not trains."""
    trained = []

    def job(value: float, result: list) -> None:
        cache, model = Fp32Cache(tmp_path, {"k": 1}), nn.Linear(2, 2)
        with cache.lock():
            if not cache.load(model):
                time.sleep(0.5)  # training
                nn.init.constant_(model.weight, value)
                trained.append(value)
                cache.save(model)
        result.append(model.weight.detach().clone())

    first, second = [], []
    a = threading.Thread(target=job, args=(1.0, first))
    a.start()
    time.sleep(0.1)
    b = threading.Thread(target=job, args=(2.0, second))
    b.start()
    a.join(), b.join()
    assert trained == [1.0]
    assert torch.equal(first[0], second[0]) and torch.all(second[0] == 1.0)
    assert [p.name for p in tmp_path.glob("*.tmp")] == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:export_onnx.*left float")  # the skipped classifier
def test_runs_with_the_same_float_config_train_it_once(tmp_path, caplog):
    cache = f"fp32_cache_dir={tmp_path / 'cache'}"
    common = [*(o for o in TINY if o != "fp32_cache=false"), "fp32_epochs=1", cache]
    with caplog.at_level(logging.INFO, logger="qat_lightning"):
        first = train(compose_config([*common, f"output_dir={tmp_path / 'a'}"]))
        assert not any("reusing cached" in r.getMessage() for r in caplog.records)
        caplog.clear()
        # another quantization setting, same float phase (as in a bits sweep)
        second = train(
            compose_config(
                [*common, "quant.skip=[model.classifier]", f"output_dir={tmp_path / 'b'}"]
            )
        )
        reused = [r.getMessage() for r in caplog.records if "reusing cached" in r.getMessage()]
        assert reused == [f"fp32: reusing cached checkpoint {second['fp32_cache']}"]
        assert not any("float phase:" in r.getMessage() for r in caplog.records)
        caplog.clear()
        other_seed = train(compose_config([*common, "seed=1", f"output_dir={tmp_path / 'c'}"]))
        assert not any("reusing cached" in r.getMessage() for r in caplog.records)
    assert first["fp32_cache"] is None and other_seed["fp32_cache"] is None
    assert second["fp32_accuracy"] == first["fp32_accuracy"]
    assert len(list((tmp_path / "cache").glob("fp32-*.pt"))) == 2
    # the skip names the layer as quant_health.csv names its quantizers
    for run, expected in (("a", True), ("b", False)):
        with open(tmp_path / run / "quant_health.csv") as f:
            names = [row["quantizer"] for row in csv.DictReader(f)]
        assert any(n.startswith("model.classifier.") for n in names) is expected
