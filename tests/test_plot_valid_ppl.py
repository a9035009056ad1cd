"""examples/language_model/plot_valid_ppl.py: the validations read from fairseq-train's log lines,
one curve per row and results folder, nothing drawn where nothing was logged."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_plot_script():
    spec = importlib.util.spec_from_file_location(
        "plot_valid_ppl", os.path.join(ROOT, "examples/language_model/plot_valid_ppl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def valid_line(epoch, ppl, updates, best=""):
    # as fairseq-train --log-format simple writes it (best_loss from the second validation on)
    return (f"2026-12-06 21:24:24 | INFO | valid | epoch {epoch:03d} | valid on 'valid' subset | loss 2.724 "
            f"| ppl {ppl} | wps 4289.1 | wpb 6971.4 | bsz 27.2 | num_updates {updates}{best}\n")


def test_valid_curves_from_train_logs(tmp_path):
    plot = load_plot_script()
    seed1, seed2 = tmp_path / "seed1", tmp_path / "seed2"
    (seed1 / "deltanet").mkdir(parents=True)
    (seed1 / "deltanet" / "train.log").write_text(
        "epoch 001 | loss 3.1 | ppl 8.5 | num_updates 50\n" + valid_line(1, 9.5, 50)
        + valid_line(1, 7.25, 123, " | best_loss 2.4") + valid_line(2, 6.5, 150, " | best_loss 2.3"))
    (seed1 / "softmax").mkdir()
    (seed1 / "softmax" / "train.log").write_text("epoch 001 | loss 3.1 | ppl 8.5 | num_updates 50\n")
    (seed2 / "deltanet").mkdir(parents=True)
    (seed2 / "deltanet" / "train.log").write_text(valid_line(1, 9.0, 25) + valid_line(1, 8.0, 25))
    found = plot.curves([str(seed1), str(seed2), str(tmp_path / "absent")])
    assert found == {(str(seed1), "deltanet"): ([50, 123, 150], [9.5, 7.25, 6.5]),
                     (str(seed2), "deltanet"): ([25], [8.0])}  # the last of one update's validations
    png = tmp_path / "valid.png"
    plot.main([str(png), str(seed1), str(seed2)])
    assert png.read_bytes()[:4] == b"\x89PNG"
    plot.main([str(tmp_path / "none.png"), str(seed1 / "softmax")])
    assert not (tmp_path / "none.png").exists()
