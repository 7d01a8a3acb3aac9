"""``python -m mmloss.bench --model``: the performance model counts GEMMs, bytes and workspace
from the code paths themselves (run on meta tensors), and the issue-11 acceptance checks of the
Triton GEMM path are read off those counts."""
from __future__ import annotations

import json

import pytest
import torch

from mmloss.bench import cli, model
from mmloss.bench.devices import DEVICES
from mmloss.ops.triton import _config, _launch

H100 = DEVICES["h100"]
BF16 = torch.bfloat16
MIB = 1 << 20


def _rows(loss, n, d, path, device=H100, dtype=BF16, deterministic=True):
    s = model.Scenario(loss, n, n, d, dtype, deterministic)
    return s, model.predict(s, path, device, model.count(s, path, device), model.fp32_matmul_exact())


@pytest.mark.parametrize("n,d", [(64, 64), (200, 48), (32768, 768)])
def test_torch_backend_clip_is_four_gemm_equivalents(n, d):
    _, row = _rows("clip", n, d, "torch", dtype=torch.float32)
    assert not row["error"], row["error"]
    assert row["gemm_equivalents"] == pytest.approx(4.0, abs=1e-9)


@pytest.mark.parametrize("n,d", [(64, 64), (300, 40)])
def test_torch_backend_siglip_sum_is_three_gemm_equivalents(n, d):
    _, row = _rows("siglip", n, d, "torch", dtype=torch.float32)
    assert row["gemm_equivalents"] == pytest.approx(3.0, abs=1e-9)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_meta_counts_equal_an_executed_cpu_run(loss):
    """The meta run (what the model uses at any size) counts exactly what a real run does."""
    s = model.Scenario(loss, 96, 80, 40, torch.float32)
    real = model.count(s, "torch", H100, tensors="cpu")
    meta = model.count(s, "torch", H100)
    assert not real.error and not meta.error
    for rec_real, rec_meta in ((real.recorder, meta.recorder),):
        assert rec_real.gemm_flops() == rec_meta.gemm_flops() > 0
        assert rec_real.launches == rec_meta.launches > 0
        for level in ("hbm", "l2"):
            assert rec_real.bytes_at(level) == rec_meta.bytes_at(level)
    assert real.workspace_bytes == meta.workspace_bytes > 0


@pytest.mark.parametrize("device,d", [("h100", 768), ("h100", 512), ("a100", 768)])
def test_fused_clip_counts_follow_the_launch_plan(device, d):
    """1 statistics pass + 2 owner passes, each recomputing the tile once per D slice of the
    modelled GPU's tile table: 1 + 2·(s + 1) GEMM-equivalents (7 at D = 768 on sm_90 bf16)."""
    dev = DEVICES[device]
    n = 32768
    tiles = _config.table_tiles(dev.arch, BF16, "owner")
    slices = _launch.owner_plan(n, n, d, tiles, True, _launch.SPLIT_ALIGN, dev.sms).slices
    _, row = _rows("clip", n, d, "fused", device=dev)
    assert not row["error"], row["error"]
    assert row["gemm_equivalents"] == pytest.approx(1 + 2 * (slices + 1))
    # the owners re-stream operand tiles from L2: far more L2 than HBM traffic
    assert row["l2_bytes_per_logit"] > 20 * row["hbm_bytes_per_logit"]


def test_modelled_device_is_restored():
    before = (_config.arch_key, _launch.target_programs, _launch.split_align)
    with model.modelled_device(H100):
        from mmloss.ops.triton import owner

        assert owner.target_programs(torch.device("meta"), 1) == H100.sms
        assert _config.tiles("owner", torch.device("meta"), BF16) == _config.table_tiles("sm90", BF16, "owner")
    assert (_config.arch_key, _launch.target_programs, _launch.split_align) == before


# --------------------------------------------------------------------------- issue 11 acceptance


GEMM_REASON = model.gemm_path_reason()
needs_gemm_path = pytest.mark.skipif(GEMM_REASON is not None, reason=GEMM_REASON or "")


@needs_gemm_path
@pytest.mark.parametrize("loss,gemms", [("clip", 4.0), ("siglip", 3.0)])
def test_gemm_path_acceptance_at_32k(loss, gemms):
    """Issue 11: at N = M = 32768, D = 768, bf16 the gemm path makes exactly 4 GEMM-equivalents
    for CLIP forward + backward (3 for the summed sigmoid), all on tensor cores, moves ≤ 24
    bytes per logit outside the GEMMs and needs ≤ 256 MiB above inputs and gradients."""
    _, row = _rows(loss, 32768, 768, "gemm")
    assert not row["error"], row["error"]
    assert row["gemm_equivalents"] == pytest.approx(gemms, abs=1e-9)
    assert row["tensor_core_gemm_equivalents"] == pytest.approx(gemms, abs=1e-9)
    assert row["non_gemm_bytes_per_logit"] <= 24.0
    assert row["peak_above_results_mib"] <= 256.0
    assert row["workspace_mib"] <= 256.0


@needs_gemm_path
def test_gemm_path_is_what_the_model_counted():
    """MMLOSS_TRITON_PATH=gemm must not fall back to the fused kernels (the model refuses that)."""
    s = model.Scenario("clip", 4096, 4096, 768, BF16)
    counted = model.count(s, "gemm", H100)
    assert not counted.error, counted.error
    kernels = {model.kernel_group(t.what, False) for t in counted.recorder.transfers}
    assert not any(k.startswith(("owner#", "lse_stats#")) for k in kernels)


# --------------------------------------------------------------------------- the command


def test_model_command_table_and_json(tmp_path, capsys):
    path = tmp_path / "model.json"
    assert cli.main(["--model", "h200", "--loss", "clip", "--sizes", "4096", "--paths", "fused,torch",
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED GPU speed — H200 SXM" in out and "ESTIMATE" in out
    assert "N = 4096, M = 4096, D = 768, bfloat16" in out
    doc = json.loads(path.read_text())
    assert "not measurements" in doc["meta"]["note"]
    rows = doc["predictions"]
    assert {r["path"] for r in rows} == {"fused", "torch"} and all(r["prediction"] for r in rows)
    torch_row = next(r for r in rows if r["path"] == "torch")
    assert torch_row["gemm_equivalents"] == pytest.approx(4.0)
    # the floor is 4 GEMMs at the published bf16 peak
    assert torch_row["floor_ms"] == pytest.approx(4 * 2 * 4096 * 4096 * 768 / 989e12 * 1e3)
    assert torch_row["predicted_ms"] > torch_row["floor_ms"]


def test_predicted_next_to_measured(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    lines = [
        {"section": "clip", "impl": "floor (4 x mm)", "N": 4096, "D": 768, "total_ms": 1.0, "path": "fused"},
        {"section": "clip", "impl": "triton deterministic (default)", "N": 4096, "D": 768, "total_ms": 3.0,
         "path": "fused"},
        {"section": "clip", "impl": "triton fastest (deterministic=False)", "N": 4096, "D": 768, "total_ms": 2.5,
         "path": "auto"},
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out_json = tmp_path / "model.json"
    assert cli.main(["--model", "h100", "--loss", "clip", "--sizes", "4096", "--paths", "fused",
                     "--measured", str(tmp_path), "--json", str(out_json)]) == 0
    assert "meas. × floor" in capsys.readouterr().out
    rows = {r["mode"]: r for r in json.loads(out_json.read_text())["predictions"]}
    assert rows["deterministic"]["measured_ms"] == 3.0
    assert rows["deterministic"]["measured_over_floor"] == pytest.approx(3.0)
    assert rows["deterministic=False"]["measured_ms"] == 2.5
    assert rows["deterministic"]["measured_over_predicted"] == pytest.approx(3.0 / rows["deterministic"]["predicted_ms"])


def test_model_refuses_losses_it_does_not_cover(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--model", "h100", "--loss", "ntxent"])
    assert "--model covers the losses" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--measured", "x.json"])
