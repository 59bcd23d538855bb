"""experiments/lm_stdlib.py --smoke: issue 14's whole LM pipeline on a few hundred bytes of the
standard library's own source (tiny GPT-2, a few steps): fp32, PTQ, QAT (ours, and torchao
where it is installed in the side folder) of three schemes, one of them with int4 embeddings,
the MatMulNBits exports in onnxruntime."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import lm_data  # noqa: E402
import lm_stdlib  # noqa: E402
import lm_torchao  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("lm")
    cwd = tmp_path_factory.mktemp("cwd")
    result = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "lm_stdlib.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # everything it writes goes under --out
    return json.loads((out / "results.json").read_text()), result.stdout, out


@pytest.mark.slow
def test_every_perplexity_is_finite_and_each_qat_side_ran(smoke) -> None:
    results, stdout, _ = smoke
    assert results["corpus_bytes"] == {"train": 600, "val": 600, "test": 600}
    phases = [results["fp32"], results["fp32_continued"]]
    assert list(results["schemes"]) == ["w4_g32", "8da4w", "w4_g32_emb"]
    for name, embeddings in (("w4_g32", 0), ("8da4w", 0), ("w4_g32_emb", 2)):
        r = results["schemes"][name]
        phases += [r["ptq"], r["qat_ours"]]
        for phase in (r["ptq"], r["qat_ours"]):
            assert phase["quantized_linears"] == 5, r  # 4 projections + the LM head
            assert phase["quantized_embeddings"] == embeddings, r  # wte and wpe, or none
        torchao = r["qat_torchao"]
        if lm_torchao.torchao_available(lm_stdlib.DEFAULT_PEERS):
            assert "test" in torchao, torchao  # installed: it runs, or says why in "skipped"
            assert torchao["quantized_linears"] == 5, torchao
            assert torchao["quantized_embeddings"] == embeddings, torchao
            phases.append(torchao)
            row = f"| {name} | 5 / 5 | {embeddings} / {embeddings} |"
        else:
            assert "not installed" in torchao["skipped"]
            row = f"| {name} | 5 / - | {embeddings} / - |"
        assert row in stdout, stdout
    for phase in phases:
        for split in ("val", "test"):
            assert math.isfinite(phase[split]) and phase[split] > 1.0, phase
    assert "CPU:" in stdout


@pytest.mark.slow
@pytest.mark.parametrize(("name", "embeddings"), [("w4_g32", 0), ("w4_g32_emb", 2)])
def test_the_onnx_model_scores_what_the_converted_model_scores(smoke, name, embeddings) -> None:
    results, stdout, out = smoke
    o = results["onnx"]
    r = o["schemes"][name]
    assert r["onnx_test"] == pytest.approx(r["converted_test"], rel=1e-4)
    # eval mode of the QAT model is the converted model
    assert r["converted_test"] == pytest.approx(results["schemes"][name]["qat_ours"]["test"])
    assert o["fp32_onnx_test"] == pytest.approx(results["fp32"]["test"], rel=1e-4)
    assert r["quantized_embeddings"] == embeddings
    graph = onnx.load(str(out / f"lm_{name}.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 5, ops
    # a quantized table is an int4 initializer (rows, width), dequantized per block in the graph
    assert ops.count("DequantizeLinear") == embeddings, ops
    a = results["args"]
    int4 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT4]
    tables = sorted(list(t.dims) for t in int4 if t.dims[-1] == a["width"])
    wte, wpe = [256, a["width"]], [max(a["context"], a["timing_length"]), a["width"]]
    assert tables == (sorted([wte, wpe]) if embeddings else []), tables
    assert o["bytes"][f"{name}_onnx"] < o["bytes"]["fp32_onnx"]
    assert r["size_of_fp32"] == o["bytes"][f"{name}_onnx"] / o["bytes"]["fp32_onnx"]
    assert o["ms_per_token"][f"{name}_onnx"] > 0
    assert f"| {name} ONNX (onnxruntime) | {embeddings} | {r['onnx_test']:.4f} |" in stdout


@pytest.mark.slow
def test_int4_embeddings_make_the_onnx_file_smaller(smoke) -> None:
    results, _, _ = smoke
    size, a = results["onnx"]["bytes"], results["args"]
    # wte (256 x width) and wpe (positions x width): a float32 entry (4 bytes) becomes 4 bits
    # and a float32 scale per 32 (0.625 bytes), so more than 3 bytes saved per entry
    entries = (256 + max(a["context"], a["timing_length"])) * a["width"]
    assert size["w4_g32_emb_onnx"] < size["w4_g32_onnx"] - 3 * entries


def test_torchao_missing_is_reported_not_raised(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lm_torchao, "torchao_in_environment", lambda: False)
    args = argparse.Namespace(peer_dir=tmp_path / "nowhere")
    result = lm_torchao.run_qat_torchao(
        argparse.Namespace(args=args), "w4_g32_emb", lm_stdlib.SCHEMES["w4_g32_emb"]
    )  # no model is built before the check
    assert result == {
        "skipped": f"torchao is neither installed (the dev extra installs it) nor in "
        f"--peer-dir {args.peer_dir}"
    }


def test_splits_are_by_file_and_deterministic() -> None:
    files = lm_data.stdlib_files()
    root = lm_data.stdlib_root()
    names = {s: {p.relative_to(root).as_posix() for p in files[s]} for s in lm_data.SPLITS}
    assert all(names.values())
    assert not (names["train"] & names["val"] or names["train"] & names["test"])
    assert not names["val"] & names["test"]
    assert all(lm_data.split_of(n) == s for s, group in names.items() for n in group)
    assert not any("site-packages" in n for group in names.values() for n in group)
    head = lm_data.split_bytes("val", max_bytes=500)
    assert len(head) == 500 and head == lm_data.split_bytes("val", max_bytes=500)
    assert head == files["val"][0].read_bytes()[:500] or len(files["val"][0].read_bytes()) < 500


def test_training_order_does_not_depend_on_batches_read_before() -> None:
    corpus = lm_data.StdlibCorpus(length=16, batch_size=4, eval_windows=4, max_bytes=800)
    loader = corpus.train_loader()
    first = [x.tolist() for x, _ in loader]
    next(iter(loader))  # e.g. a calibration pass
    assert [x.tolist() for x, _ in loader] == first
    loader.sampler.set_epoch(1)
    assert [x.tolist() for x, _ in loader] != first
    x, y = corpus.eval["test"][0]
    assert x.shape == y.shape == (16,) and (x[1:] == y[:-1]).all()
