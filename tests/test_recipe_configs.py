"""The paper-scale recipes (examples/translation, examples/language_model): their fairseq-train
commands and their fairseq-hydra-train configs run, and build the same model (same parameter
count), shrunk to a tiny corpus and one update on the CPU."""
import os
import re

import pytest

pytest.importorskip("fairseq")
from helpers import PKG, run  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(PKG), "examples")
# The paper's models, shrunk to what a 12-word corpus and a CPU can take: 2 layers instead of 16,
# adaptive cutoffs inside the 16-symbol dictionary, one update.
SHRINK_CLI = ["--decoder-layers", "2", "--adaptive-input-cutoff", "6,10", "--adaptive-softmax-cutoff", "6,10",
              "--tokens-per-sample", "16", "--batch-size", "2", "--max-update", "1", "--cpu", "--num-workers", "0",
              "--disable-validation"]
SHRINK_HYDRA = ["model.decoder_layers=2", 'model.adaptive_input_cutoff="6,10"',
                'model.adaptive_softmax_cutoff="6,10"', "task.tokens_per_sample=16", "dataset.batch_size=2",
                "optimization.max_update=1", "common.cpu=true", "dataset.num_workers=0",
                "dataset.disable_validation=true"]


def params(out):
    m = re.search(r"num\. shared model params: ([0-9,]+)", out)
    assert m, out[-3000:]
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("size", ["small", "medium"])
def test_wikitext_recipe_cli_and_hydra_config_agree(tiny_lm_corpus, tmp_path, size):
    data = tiny_lm_corpus / "lm-bin"
    # examples/language_model/README.md section 2, the Delta Net row
    cli = run("fairseq-train", data, "--user-dir", PKG, "--task", "language_modeling",
              "--arch", f"fwp_lm_wiki103_{size}", "--fwp-kernel", "linear", "--fwp-update", "delta",
              "--sample-break-mode", "none", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
              "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--clip-norm", "0.25",
              "--lr", "0.00025", "--lr-scheduler", "cosine", "--warmup-updates", "2000",
              "--warmup-init-lr", "1e-07", "--save-dir", tmp_path / "cli", "--no-epoch-checkpoints",
              *SHRINK_CLI)
    hydra = run("fairseq-hydra-train", "--config-dir", os.path.join(EXAMPLES, "language_model", "config"),
                "--config-name", f"wiki103_{size}",
                f"task.data={data}", f"common.user_dir={PKG}", f"checkpoint.save_dir={tmp_path / 'hydra'}",
                "model.fwp_kernel=linear", "model.fwp_update=delta", f"hydra.run.dir={tmp_path / 'out'}",
                *SHRINK_HYDRA)
    assert "done training" in cli and "done training" in hydra
    assert params(hydra) == params(cli)
    assert (tmp_path / "hydra" / "checkpoint_last.pt").exists()


# Transformer big shrunk to 1+1 layers of 64 dims; --fp16 (GPU only) dropped; validation with
# BLEU kept, as it picks the best checkpoint.
SHRINK_MT = {"encoder_layers": 1, "decoder_layers": 1, "encoder_embed_dim": 64, "decoder_embed_dim": 64,
             "encoder_ffn_embed_dim": 128, "decoder_ffn_embed_dim": 128, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4}


def test_wmt14_recipe_cli_and_hydra_config_agree(corpus, tmp_path):  # noqa: F811
    data = corpus / "mt-bin"
    # examples/translation/README.md section 2, the DPFP nu=2 row
    cli = run("fairseq-train", data, "--user-dir", PKG, "--arch", "fwp_transformer_wmt_en_de_big",
              "--fwp-kernel", "dpfp", "--fwp-dpfp-nu", "2", "--share-all-embeddings",
              "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
              "--lr", "0.0005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
              "--warmup-init-lr", "1e-07", "--dropout", "0.3", "--weight-decay", "0.0",
              "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
              "--max-tokens", "400", "--update-freq", "1", "--max-epoch", "45",
              "--eval-bleu", "--eval-bleu-args", '{"beam": 4, "lenpen": 0.6}', "--eval-bleu-remove-bpe",
              "sentencepiece", "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
              "--save-dir", tmp_path / "cli", "--no-epoch-checkpoints",
              "--max-update", "1", "--cpu", "--num-workers", "0",
              *[x for k, v in SHRINK_MT.items() for x in ("--" + k.replace("_", "-"), v)])
    hydra = run("fairseq-hydra-train", "--config-dir", os.path.join(EXAMPLES, "translation", "config"),
                "--config-name", "wmt14_en_de_big", f"task.data={data}", f"common.user_dir={PKG}",
                f"checkpoint.save_dir={tmp_path / 'hydra'}", "model.fwp_kernel=dpfp", "+model.fwp_dpfp_nu=2",
                "common.fp16=false", "common.cpu=true", "dataset.max_tokens=400", "optimization.update_freq=[1]",
                "optimization.max_update=1", "dataset.num_workers=0", f"hydra.run.dir={tmp_path / 'out'}",
                *[f"+model.{k}={v}" for k, v in SHRINK_MT.items()])
    for out in (cli, hydra):
        assert "done training" in out and re.search(r"valid on 'valid' subset .*\| bleu ", out), out[-3000:]
        assert "FastWeightAttention" in out
    assert params(hydra) == params(cli)
    assert (tmp_path / "hydra" / "checkpoint_best.pt").exists()
