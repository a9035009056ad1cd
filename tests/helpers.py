"""Helpers shared by the tests (one module; test files never import each other).

- ops: inputs for the recurrences (sum-normalised features keep the delta rule contractive, so
  fp32 comparisons measure the algorithm, not an exploding recurrence), errors, gradients;
- fairseq CLIs: run a fairseq command with --user-dir and nothing else of ours;
- models: build a model through fairseq's own argparse -> omegaconf -> build_model path;
- legacy checkpoints (tests/fixtures/legacy): fixed inputs, forward passes, greedy decoding.
fairseq is imported inside the functions that need it: the ops tests run without it."""
import os
import subprocess
import sys
import types

import torch

import fwp_fairseq

PKG = os.path.dirname(os.path.abspath(fwp_fairseq.__file__))
BIN = os.path.dirname(sys.executable)
WORDS = [chr(ord("a") + i) for i in range(12)]
COMMON = ["--user-dir", PKG, "--cpu", "--seed", "1"]
TRAIN = ["--optimizer", "adam", "--lr", "1e-3", "--no-progress-bar", "--log-format", "simple",
         "--log-interval", "1", "--num-workers", "0", "--no-epoch-checkpoints", "--disable-validation"]
VOCAB = 16


# -- ops ----------------------------------------------------------------------------------
def make_inputs(B, H, T, Dk, Dv, dtype=torch.float64, seed=0, with_state=False, requires_grad=True,
                positive=False, device="cpu"):
    """[q, k, v, beta, state]: q, k (B, H, T, Dk) with features summing to 1, v (B, H, T, Dv)
    N(0, 1), beta (B, H, T) U(0, 1), state (B, H, Dk, Dv) or None without with_state.
    Features: softmax of N(0, 1) draws, or with positive=True (U(0, 1) + 0.1) / sum, as the
    models feed them, with the state at 0.5 N(0, 1) (the CUDA tests; POSITIVE below)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def features():
        if not positive:
            return rnd(B, H, T, Dk).softmax(-1)
        x = torch.rand(B, H, T, Dk, generator=g, dtype=torch.float64) + 0.1
        return x / x.sum(-1, keepdim=True)

    q, k, v = features(), features(), rnd(B, H, T, Dv)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    state = (0.5 if positive else 1.0) * rnd(B, H, Dk, Dv) if with_state else None
    out = [q, k, v, beta, state]
    return [None if x is None else x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for x in out]


# make_inputs(..., **POSITIVE): the CUDA tests' inputs, [q, k, v, beta, h0] with positive
# features (the delta rule stays stable in every dtype), no grad (loss_grads makes leaves).
POSITIVE = dict(positive=True, with_state=True, requires_grad=False)


def skewed_log_decay(B, H, T, dtype=torch.float32, device="cpu", seed=0, low=-5.0):
    """A forget gate's log-decay g (B, H, T) in [low, 0] (a_t = exp(g_t) from 1 down to
    exp(low)), skewed towards mild decays so that some state survives many steps (the CUDA tests)."""
    gen = torch.Generator().manual_seed(seed)
    g = low * torch.rand(B, H, T, generator=gen, dtype=torch.float64) ** 2
    return g.to(device=device, dtype=dtype)


def gated_reference(q, k, v, beta, h0, g):
    """The ops' step-by-step gated rule (beta None: the sum rule) -> (o, final state)."""
    from fwp_fairseq.ops.delta_rule.reference import delta_rule_reference
    from fwp_fairseq.ops.sum_rule.reference import sum_rule_reference
    if beta is None:
        return sum_rule_reference(q, k, v, h0, True, g=g)
    return delta_rule_reference(q, k, v, beta, h0, True, g=g)


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_rms(a, b):
    """RMS of a - b over RMS of b, in float64."""
    a, b = a.double(), b.double()
    return (((a - b) ** 2).mean().sqrt() / (b ** 2).mean().sqrt().clamp_min(1e-30)).item()


# Relative RMS error allowed to the chunk kernels' fp16/bf16 results against fp64 on the same
# rounded inputs (the tile products' operands S, U, P are rounded to the input type); about 3x
# what the emulated kernels show (T = 150, Dk = 64: at most 3.6e-4 fp16, 2.9e-3 bf16).
CHUNK_HALF_TOL = {torch.float16: 0.003, torch.bfloat16: 0.01}


def log_decay(B, H, T, dtype=torch.float64, seed=1, requires_grad=True):
    """Log-decays g <= 0 for the gated rules: decays exp(g) spread over (0, 1), most near 1."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.nn.functional.logsigmoid(2 * torch.randn(B, H, T, generator=gen, dtype=torch.float64) + 2)
    return g.to(dtype).requires_grad_(requires_grad)


INPUT_NAMES = ("q", "k", "v", "beta", "h0", "g")


def loss_grads(fn, inputs, seed=1):
    """{"o", "final", and each of INPUT_NAMES that got a gradient} of fn(*inputs) -> (o, final
    state), called on fresh leaf copies of inputs (q, k, v, beta, h0[, g]; None stays None): the
    outputs, and the gradients of a fixed random linear loss on both. Works on any device."""
    xs = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    o, ht = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)
    wh = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(ht)
    ((o * wo).sum() + (ht * wh).sum()).backward()
    out = {"o": o.detach(), "final": ht.detach()}
    out.update((n, x.grad) for n, x in zip(INPUT_NAMES, xs) if x is not None and x.grad is not None)
    return out


def run_with_grads(fn, q, k, v, beta, state, impl, seed=123, log_g=None):
    """loss_grads of an op (fast_weight_sum, beta None; fast_weight_delta) with impl and the
    optional log-decays log_g, as a list: [o, final state, the gradient of each given input
    in the order q, k, v, beta, state, log_g] (a given input without a gradient is an error)."""
    def call(q, k, v, beta, state, log_g):
        args = (q, k, v) if beta is None else (q, k, v, beta)
        gated = {} if log_g is None else {"g": log_g}
        return fn(*args, initial_state=state, output_final_state=True, impl=impl, **gated)

    inputs = [q, k, v, beta, state, log_g]
    out = loss_grads(call, inputs, seed)
    return [out["o"], out["final"], *(out[n] for n, x in zip(INPUT_NAMES, inputs) if x is not None)]


# -- attention layer ---------------------------------------------------------------------

def check_decoding_buffer(buf, dtype=None):
    """One attention layer's decoding state (an ops FactoredState buffer), as the layer promises:
    it stores at most numel(S) + numel(z) elements and every tensor is in `dtype` when given.
    Returns (folded into S, sorted shapes): the shapes stay constant once folded."""
    keys, values, S, z = (buf.get(n) for n in ("fw_keys", "fw_values", "fw_state", "fw_z"))
    assert (keys is None) != (S is None), sorted(buf)  # factors or the matrix, not both
    B, H = (S if keys is None else keys).shape[:2]
    dk, dv = S.shape[-2:] if keys is None else (keys.shape[-1], values.shape[-1])
    tensors = [x for x in buf.values() if torch.is_tensor(x)]
    bound = B * H * dk * dv + (0 if z is None else z.numel())
    assert sum(x.numel() for x in tensors) <= bound
    if dtype is not None:
        assert all(x.dtype == dtype for x in tensors), {n: x.dtype for n, x in buf.items()}
    return S is not None, sorted((n, tuple(x.shape)) for n, x in buf.items() if torch.is_tensor(x))


# -- fairseq CLIs -------------------------------------------------------------------------

def torch_version():
    return torch.__version__.split("+")[0]


def run(tool, *args, stdin=None, cwd=None, env=None, fails=False):
    """Output of a fairseq CLI, which must succeed (fails=True: must fail); env: extra variables."""
    # Only the thread count is set (2 shared cores); nothing our plugin needs.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([os.path.join(BIN, tool), *map(str, args)], input=stdin, capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=600)
    out = p.stdout + p.stderr
    assert (p.returncode != 0) == fails, f"{tool} exited with {p.returncode}:\n{out[-4000:]}"
    return out


def per_update(out):
    """{update: (loss, gnorm)} from fairseq-train's --log-format json --log-interval 1."""
    import json
    import re
    recs = [json.loads(m) for m in re.findall(r"train_inner\s*[|:]\s*(\{.*\})", out)]
    return {int(r["num_updates"]): (r["loss"], r["gnorm"]) for r in recs}


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# -- models -------------------------------------------------------------------------------

def make_dict(n=VOCAB):
    from fairseq.data import Dictionary
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def build(arch, extra=(), vocab=VOCAB):
    """Build through fairseq's own path (argparse -> omegaconf -> build_model), so that the
    dataclass trap of fwp_lm is exercised exactly as under fairseq-train."""
    from fairseq import models, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    task = "language_modeling" if "lm" in arch else "translation"
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, ["/nonexistent", "--task", task, "--arch", arch, "--user-dir", PKG,
                 "--dropout", "0", *extra])
    cfg = convert_namespace_to_omegaconf(args)
    d = make_dict(vocab)
    t = types.SimpleNamespace(source_dictionary=d, target_dictionary=d)
    torch.manual_seed(0)
    return models.build_model(cfg.model, t), d


def fast_layers(model):
    """The model's fast-weight attention layers (those softmax attention did not keep)."""
    from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
    return [m for m in model.modules() if isinstance(m, FastWeightAttention)]


def randomise_new_parts(model_or_layer, seed=0):
    """Gates start input-independent (w = 0), output-norm scales at 1: give every parameter of
    the gates, short convolutions and output norms random values (fp64 draws), so that the
    tests see them act."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model_or_layer.named_parameters():
        if ".gate." in f".{name}" or "output_norm" in name or "short_conv" in name:
            with torch.no_grad():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)
                        + (1.0 if name.endswith("output_norm.weight") else 0.0))


def random_tokens(d, bsz, T, gen):
    return torch.randint(d.nspecial, len(d), (bsz, T), generator=gen)


# -- legacy checkpoints -------------------------------------------------------------------
def load_legacy(folder, name):
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


def run_models(folder, dtype=torch.float32):
    import fwp_fairseq
    fwp_fairseq.register()
    out = {}
    with torch.no_grad():
        for name in ("stream", "perf"):
            model = load_legacy(folder, name).to(dtype)
            if getattr(model, "carry_state", False):
                model.set_carry_state(False)  # a plain forward pass over independent segments
            out[name] = model(_tokens(0, (2, 12)))[0].tolist()
        model = load_legacy(folder, "mt").to(dtype)
        src, prev = _tokens(1, (2, 7)), _tokens(2, (2, 5))
        out["mt"] = model(src, torch.full((2,), 7), prev)[0].tolist()
        out["mt_greedy"] = _greedy(model, src).tolist()
    return out


# ---------------------------------------------------------------- the CUDA kernels' CPU emulator

class KernelLib:
    """Base of the emulator wrappers: _p passes a tensor (16-byte aligned, contiguous) or None
    as a pointer, _sizes the element counts of such arguments (as binding.cpp does); _check
    raises the C entry point's error text."""

    @staticmethod
    def _p(t):
        if t is None:
            return None
        assert t.is_contiguous() and t.data_ptr() % 16 == 0
        return t.data_ptr()

    @staticmethod
    def _check(err):
        if err is not None:
            raise RuntimeError(err.decode())

    @staticmethod
    def _sizes(*tensors):
        import ctypes
        return (ctypes.c_longlong * len(tensors))(*(0 if t is None else t.numel() for t in tensors))


def build_kernel_emulator(name, kernels, headers):
    """A ctypes library of fwp_fairseq/csrc's `kernels` compiled with g++ -DFWP_EMU (fwp_emu.h),
    cached under build/emu/<name>-<hash of kernels and headers>; skips the test without g++."""
    import ctypes
    import hashlib
    import shutil

    import pytest

    from fwp_fairseq.ops import cuda_backend

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    files = [os.path.join(cuda_backend.CSRC, f) for f in (*kernels, *headers)]
    digest = hashlib.sha1(b"".join(open(f, "rb").read() for f in files)).hexdigest()[:12]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.join(root, "build", "emu", f"{name}-{digest}")
    lib = os.path.join(out_dir, "libfwp_emu.so")
    if not os.path.exists(lib):
        os.makedirs(out_dir, exist_ok=True)
        tmp = lib + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-DFWP_EMU",
               "-Wno-unknown-pragmas", "-x", "c++", *files[:len(kernels)], "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def full_and_incremental(model, prev, encoder_out=None):
    """Log-probs of one full decoder forward and of step-by-step incremental decoding."""
    kw = {} if encoder_out is None else {"encoder_out": encoder_out}
    full = model.get_normalized_probs(model.decoder(prev, **kw), log_probs=True)
    state, steps = {}, []
    for t in range(prev.size(1)):
        out = model.decoder(prev[:, : t + 1], incremental_state=state, **kw)
        steps.append(model.get_normalized_probs(out, log_probs=True))
    return full, torch.cat(steps, dim=1)


def lm_full_and_incremental(model, d):
    """full_and_incremental for an fwp_lm in fp64 (the model is converted in place): two
    random 11-token continuations of eos."""
    model.double().eval()
    prev = torch.cat([torch.full((2, 1), d.eos()), random_tokens(d, 2, 11, torch.Generator().manual_seed(2))], 1)
    with torch.no_grad():
        return full_and_incremental(model, prev)


def mt_full_and_incremental(model, d, seed=1):
    """full_and_incremental for an fwp_transformer in fp64 (the model is converted in place):
    three random sources (the first left-padded by two) and 8-token targets."""
    model.double().eval()
    g = torch.Generator().manual_seed(seed)
    src = random_tokens(d, 3, 7, g)
    src[0, :2] = d.pad()
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=torch.tensor([5, 7, 7]))
        prev = torch.cat([torch.full((3, 1), d.eos()), random_tokens(d, 3, 8, g)], dim=1)
        return full_and_incremental(model, prev, enc)


def assert_incremental_close(inc, full, hybrid=False):
    """Incremental vs full log-probs of an fp64 model: exact (1e-10) for fast-weight layers; a
    hybrid's softmax layers run fairseq's softmax in fp32 (utils.softmax casts), whose rounding
    differs between the two orders: measured ~1 fp32 ulp of the largest log-prob, 16 allowed."""
    tol = 16 * torch.finfo(torch.float32).eps * full.abs().max().item() if hybrid else 1e-10
    torch.testing.assert_close(inc, full, atol=tol, rtol=0 if hybrid else 1e-10)


def beam_search_matches_rescoring(model, d, is_lm, beam_size, max_len_b):
    """Beam search over four padded sources (LM: four forced prefixes); asserts that every
    hypothesis's positional scores equal a full forward over it. Returns the hypotheses.
    Runs an fp64 copy of the model: beam search (incremental, reordered states) and the full
    forward reduce in different orders, which fp32 resolves only to round-off times depth
    (CPU-dependent). In fp64 the logits of both agree to ~1e-15, but fairseq's log_softmax
    casts them to fp32 (utils.log_softmax), so a score may differ by a rounding flip there: a
    few fp32 ulps of the largest logit, the tolerance below."""
    import copy

    from fairseq.sequence_generator import SequenceGenerator
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(5)
    src = random_tokens(d, 4, 5, g)
    src[1, :2] = d.pad()
    lengths = torch.tensor([5, 3, 5, 5])
    gen = SequenceGenerator([model], d, beam_size=beam_size, max_len_b=max_len_b)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    with torch.no_grad():
        # LM: different forced prefixes make the four sentences differ.
        hypos = gen.generate([model], sample, prefix_tokens=src[:, -2:] if is_lm else None)
        for i, beams in enumerate(hypos):
            for h in beams:
                tokens = h["tokens"].unsqueeze(0)
                prev = torch.cat([torch.full((1, 1), d.eos()), tokens[:, :-1]], 1)
                if is_lm:
                    out = model(prev)
                else:
                    keep = src[i].ne(d.pad())
                    out = model(src[i][keep].unsqueeze(0), lengths[i: i + 1], prev)
                lp = model.get_normalized_probs(out, log_probs=True)[0].gather(-1, tokens[0].unsqueeze(-1))[:, 0]
                tol = 4 * torch.finfo(torch.float32).eps * out[0].abs().max().item()
                torch.testing.assert_close(lp, h["positional_scores"], atol=tol, rtol=0)
    return hypos


def assert_rel_close(a, b, tol):
    """max |a - b| / max |b| below tol (the emulated-kernel tests' check)."""
    scale = b.abs().max().clamp_min(1e-12)
    assert (a.double() - b.double()).abs().max() / scale < tol, (a - b).abs().max()


def assert_bit_reproducible(run):
    """run() -> (o, final state, {name: grad}); two calls must agree bit for bit."""
    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name])


def assert_no_grad_forward_stores_nothing(fwd, shape, dtype, tol):
    """fwd(q, k, v, beta, h0) -> (o, final state), called under no_grad: it must store no final
    state (None) and its o must match the fp64 delta-rule reference."""
    from fwp_fairseq.ops.delta_rule.reference import delta_rule_reference
    q, k, v, beta, h0 = make_inputs(*shape, dtype, **POSITIVE)
    with torch.no_grad():
        o, ht = fwd(q, k, v, beta, h0)
    assert ht is None
    assert_rel_close(o, delta_rule_reference(*(x.double() for x in (q, k, v, beta, h0)))[0], tol)


def assert_padded_batch_matches_alone(model, d, tol):
    """fwp_transformer (in eval mode): a batch of two sentences, the first left-padded in the
    source and right-padded in the target as fairseq batches them, gives each sentence the
    outputs it gets alone."""
    g = torch.Generator().manual_seed(3)
    src_a, tgt_a = random_tokens(d, 1, 4, g), random_tokens(d, 1, 3, g)
    src_b, tgt_b = random_tokens(d, 1, 7, g), random_tokens(d, 1, 6, g)
    eos, pad = torch.full((1, 1), d.eos()), d.pad()
    prev_a, prev_b = torch.cat([eos, tgt_a], 1), torch.cat([eos, tgt_b], 1)
    src = torch.cat([torch.cat([torch.full((1, 3), pad), src_a], 1), src_b])
    prev = torch.cat([torch.cat([prev_a, torch.full((1, 3), pad)], 1), prev_b])
    with torch.no_grad():
        batch = model(src, torch.tensor([4, 7]), prev)[0]
        alone_a = model(src_a, torch.tensor([4]), prev_a)[0]
        alone_b = model(src_b, torch.tensor([7]), prev_b)[0]
    torch.testing.assert_close(batch[0, :4], alone_a[0], atol=tol, rtol=tol)
    torch.testing.assert_close(batch[1], alone_b[0], atol=tol, rtol=tol)


def assert_carried_stream_matches_whole(model, d, tol):
    """fwp_lm (in eval mode) carried over segments of 7, 1, 2, 9, 7 tokens (as fwp_stream_lm
    --fwp-carry-state feeds it) scores three streams as one forward pass over all of them, and
    segment 0 starts the streams again."""
    tokens = random_tokens(d, 3, 26, torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens)[0]
        model.set_carry_state(True)
        parts, start = [], 0
        for i, n in enumerate([7, 1, 2, 9, 7]):
            parts.append(model(tokens[:, start:start + n], stream_segment=i)[0])
            start += n
        again = model(tokens[:, :7], stream_segment=0)[0]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=tol, atol=tol)
    torch.testing.assert_close(again, whole[:, :7], rtol=tol, atol=tol)
