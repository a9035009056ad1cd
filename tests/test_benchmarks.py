"""The GPU benchmark's own logic, on the CPU: the table written from its results (failures and
skips named, not hidden), and that every method has its place in the order a time budget runs them."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_table_names_skipped_and_failed_columns(tmp_path):
    gpu_ops = _load("gpu_ops")
    results = [
        {"method": "cuda_delta_fp32", "T": 512, "D": 64, "fwd_bwd_ms": 1.0, "fwd_ms": 0.25},
        {"method": "fla_fused_recurrent_fp32", "T": 512, "D": 64, "fwd_bwd_ms": 2.0, "fwd_ms": 0.5},
        {"method": "fla_chunk_bf16", "T": 512, "D": 64, "fwd_bwd_ms": 3.0, "fwd_ms": 0.5},
        {"method": "fla_chunk_bf16", "T": 2048, "D": 64, "skipped": "time budget"},
        {"method": "cuda_delta_fp32", "T": 2048, "D": 64, "error": "RuntimeError: x"},
        {"method": "cuda_sum_fp32", "T": 512, "D": 64, "skipped": "time budget"},
    ]
    path = tmp_path / "bench.md"
    gpu_ops.write_table(results, str(path), "a GPU")
    text = path.read_text()
    assert "| 512 | 64 | 1.00 (0.25) | 3.00 (0.50) | 2.00 (0.50) | 0.50x | n/a |" in text
    assert "| 2048 | 64 | err | skip | n/a | n/a | n/a |" in text
    assert "cuda_sum_fp32" in text.split("Not measured")[1]  # no number at all: named, not a column


def test_benchmark_priority_covers_every_method():
    gpu_ops = _load("gpu_ops")
    assert set(gpu_ops.methods((None, None))) <= set(gpu_ops.PRIORITY)



def test_chunk_suite_table_ratios_and_missing_cells(tmp_path):
    gpu_ops = _load("gpu_ops")
    shape = {"B": 96, "H": 8, "T": 256, "D": 16}
    results = [
        {"method": "chunk_delta_bf16", **shape, "fwd_bwd_ms": 1.0, "fwd_ms": 0.5, "peak_mb": 10.4},
        {"method": "cuda_delta_bf16", **shape, "fwd_bwd_ms": 4.0, "fwd_ms": 1.0, "peak_mb": 20.0},
        {"method": "sdpa_flash_bf16", **shape, "fwd_bwd_ms": 0.5, "fwd_ms": 0.25, "peak_mb": 5.0},
        {"method": "fla_chunk_bf16", **shape, "skipped": "fla not importable"},
        {"method": "fla_fused_recurrent_bf16", **shape, "error": "RuntimeError: x"},
    ]
    path = tmp_path / "chunk.md"
    gpu_ops.write_chunk_table(results, str(path), "a GPU")
    row = "| 96 | 8 | 256 | 16 | 1.00 / 0.50 / 10 | 4.00 / 1.00 / 20 | 0.50 / 0.25 / 5 | skip | err | " \
          "0.25x | 2.00x | n/a | n/a |"
    assert row in path.read_text()
    # the paper's shapes come first, then the B=8, H=8 sweep up to T = 16384
    assert gpu_ops.CHUNK_SHAPES[:3] == [(96, 8, 256, 16), (56, 8, 384, 32), (256, 8, 64, 64)]
    assert (8, 8, 16384, 128) in gpu_ops.CHUNK_SHAPES
    assert set(gpu_ops.CHUNK_METHODS) <= set(gpu_ops.methods((None, None)))


def test_ops_table_leaves_out_other_batch_shapes(tmp_path):
    gpu_ops = _load("gpu_ops")
    results = [{"method": "cuda_delta_fp32", "T": 512, "D": 64, "fwd_bwd_ms": 1.0, "fwd_ms": 0.25},
               {"method": "cuda_delta_fp32", "B": 96, "H": 8, "T": 256, "D": 16, "fwd_bwd_ms": 1.0,
                "fwd_ms": 0.25}]
    path = tmp_path / "bench.md"
    gpu_ops.write_table(results, str(path), "a GPU")
    assert "| 256 | 16 |" not in path.read_text()


@pytest.mark.slow  # builds four fairseq models (about 10 s)
def test_layer_parts_writes_its_table(tmp_path):
    """benchmarks/layer_parts.py at a toy size: every variant timed, ratios to the core layer."""
    layer_parts = _load("layer_parts")
    layer_parts.main(["--lengths", "8", "--batch", "1", "--reps", "1", "--out", str(tmp_path)])
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert rows[2] == "| T | core | short conv 4 | rms-gated norm | both (preset) |"
    assert rows[4].startswith("| 8 | ") and rows[4].count("x)") == 3
