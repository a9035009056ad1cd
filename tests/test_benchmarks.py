"""The GPU benchmark's own logic, on the CPU: the table written from its results (failures and
skips named, not hidden), and that every method has its place in the order a time budget runs them."""
import importlib.util
import os

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

