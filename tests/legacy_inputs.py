"""What tests/test_legacy_checkpoints.py runs through the legacy checkpoints: fixed inputs, full
forward passes and incremental greedy decoding, as plain lists (JSON)."""
import os

import torch

WORDS = [chr(ord("a") + i) for i in range(12)]


def load(folder, name):
    from fairseq import checkpoint_utils
    models, _ = checkpoint_utils.load_model_ensemble(
        [os.path.join(folder, f"{name}.pt")], arg_overrides={"data": folder})
    return models[0].eval()


def _tokens(seed, shape, lo=4, hi=16):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed))


def _greedy(model, src, steps=6):
    """Incremental greedy decoding, one token at a time (the decoder's constant-size state)."""
    enc = model.encoder(src, src_lengths=torch.full((src.size(0),), src.size(1)))
    prev = torch.full((src.size(0), 1), model.decoder.dictionary.eos())
    state, logits = {}, []
    for _ in range(steps):
        out = model.decoder(prev, encoder_out=enc, incremental_state=state)[0][:, -1]
        logits.append(out)
        prev = torch.cat([prev, out.argmax(-1, keepdim=True)], 1)
    return torch.stack(logits, 1)


def run_models(folder):
    import fwp_fairseq
    fwp_fairseq.register()
    out = {}
    with torch.no_grad():
        for name in ("stream", "perf"):
            model = load(folder, name)
            if getattr(model, "carry_state", False):
                model.set_carry_state(False)  # a plain forward pass over independent segments
            out[name] = model(_tokens(0, (2, 12)))[0].tolist()
        model = load(folder, "mt")
        src, prev = _tokens(1, (2, 7)), _tokens(2, (2, 5))
        out["mt"] = model(src, torch.full((2,), 7), prev)[0].tolist()
        out["mt_greedy"] = _greedy(model, src).tolist()
    return out
