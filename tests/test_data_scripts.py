"""The data-scripts/ prepare scripts on the local copies in ../shared/data:
binarised output, dictionary sanity, round trips, idempotency, clear errors."""

import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = os.path.join(REPO, "data-scripts")
_CACHE = {}


def run_script(name, *args, check=True):
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(SCRIPTS, name), *args], env=env,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
    return p


def prepared(key, script, shared_data, tmp_path_factory, *args):
    # Prepare once per session; several tests read the same output.
    if key not in _CACHE:
        out = str(tmp_path_factory.mktemp(key) / "bin")
        p = run_script(script, "--out", out, *args)
        _CACHE[key] = (out, p)
    return _CACHE[key]


@pytest.fixture
def multi30k(shared_data, tmp_path_factory):
    # A smaller vocabulary than the recipe's 8K keeps sentencepiece quick.
    return prepared("multi30k", "prepare-multi30k.sh", shared_data, tmp_path_factory,
                    "--from", os.path.join(shared_data, "multi30k"), "--vocab-size", "2000")


@pytest.fixture
def shakespeare(shared_data, tmp_path_factory):
    return prepared("tinyshakespeare", "prepare-tinyshakespeare.sh", shared_data, tmp_path_factory,
                    "--from", os.path.join(shared_data, "tinyshakespeare"))


def load_split(out, prefix, dict_name):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(out, dict_name))
    ds = data_utils.load_indexed_dataset(os.path.join(out, prefix), d)
    assert ds is not None, f"no binarised data at {prefix}"
    return d, ds


def gz_lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


# ------------------------------------------------------------------ Multi30k

def test_multi30k_binarised(multi30k, shared_data):
    out, proc = multi30k
    assert "Produced in" in proc.stdout
    for split, n in [("train", 29000), ("valid", 1014), ("test", 1000)]:
        for lang in ("de", "en"):
            for ext in ("bin", "idx"):
                assert os.path.getsize(os.path.join(out, f"{split}.de-en.{lang}.{ext}")) > 0
    # Joint dictionary: both sides identical, frequent pieces present and ranked high.
    with open(os.path.join(out, "dict.de.txt"), encoding="utf-8") as f:
        de = f.read()
    with open(os.path.join(out, "dict.en.txt"), encoding="utf-8") as f:
        en = f.read()
    assert de == en
    top = [line.split(" ")[0] for line in en.splitlines()[:30]]
    for piece in ("\u2581a", "\u2581A", "\u2581in", "\u2581Ein", "."):
        assert piece in top, f"frequent piece {piece!r} missing from the top of the dictionary"
    # fairseq adds 4 specials; spm's 2000 pieces minus its own <unk>, maybe padded.
    d, train_en = load_split(out, "train.de-en.en", "dict.en.txt")
    assert 2000 <= len(d) <= 2016
    assert len(train_en) == 29000


def test_multi30k_no_unk_and_round_trip(multi30k, shared_data):
    import sentencepiece as spm

    out, _ = multi30k
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    for split, raw in [("valid", "val"), ("test", "test_2016_flickr")]:
        for lang in ("de", "en"):
            d, ds = load_split(out, f"{split}.de-en.{lang}", f"dict.{lang}.txt")
            assert len(ds) == len(gz_lines(os.path.join(shared_data, "multi30k", f"{raw}.{lang}.gz")))
            n_unk = sum(int((ds[i] == d.unk()).sum()) for i in range(len(ds)))
            assert n_unk == 0, f"{n_unk} <unk> in {split}.{lang}"
    d, ds = load_split(out, "valid.de-en.en", "dict.en.txt")
    raw = gz_lines(os.path.join(shared_data, "multi30k", "val.en.gz"))
    for i in range(5):
        pieces = d.string(ds[i]).split()
        assert sp.decode(pieces) == raw[i].strip()


def test_multi30k_second_run_is_noop(multi30k, shared_data):
    out, _ = multi30k
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    p = run_script("prepare-multi30k.sh", "--out", out, "--vocab-size", "2000",
                   "--from", os.path.join(shared_data, "multi30k"))
    assert "nothing to do" in p.stdout
    after = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert before == after
    # Other settings on the same folder are refused, not mixed in.
    p = run_script("prepare-multi30k.sh", "--out", out, "--vocab-size", "3000", check=False)
    assert p.returncode != 0 and "other settings" in p.stderr


# ------------------------------------------------------------------ Tiny Shakespeare

def test_tinyshakespeare_binarised_and_round_trip(shakespeare, shared_data):
    out, _ = shakespeare
    with open(os.path.join(shared_data, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()
    d, train = load_split(out, "train", "dict.txt")
    # Character level: ~65 characters (newline is </s>), no room for <unk>.
    assert 55 <= len(d) <= 80
    n = len(text)
    cut1, cut2 = int(0.9 * n), int(0.95 * n)
    splits = {"train": text[:cut1], "valid": text[cut1:cut2], "test": text[cut2:]}
    for name, part in splits.items():
        with open(os.path.join(out, "tok", f"{name}.txt"), encoding="utf-8") as f:
            assert f.read() == part
        _, ds = load_split(out, name, "dict.txt")
        toks = sum(len(ds[i]) for i in range(len(ds)))
        # one token per character; each line's newline is its </s>, plus one
        # </s> for a final unterminated line
        assert toks == len(part) + (0 if part.endswith("\n") else 1)
        assert sum(int((ds[i] == d.unk()).sum()) for i in range(len(ds))) == 0
    # Decode all of valid back to the exact text.
    _, valid = load_split(out, "valid", "dict.txt")
    lines = []
    for i in range(len(valid)):
        syms = [d[j] for j in valid[i][:-1].tolist()]  # drop </s>
        lines.append("".join(" " if s == "\u2581" else s for s in syms))
    assert "\n".join(lines) == splits["valid"].rstrip("\n")


def test_tinyshakespeare_words(shared_data, tmp_path):
    """--words: the character split's text as words and marks, one line per line; words seen
    once in train become <unk>; a different setting in the same --out is refused."""
    out = str(tmp_path / "w")
    src = os.path.join(shared_data, "tinyshakespeare")
    p = run_script("prepare-tinyshakespeare.sh", "--words", "--from", src, "--out", out)
    assert "word tokens" in p.stdout
    d, valid = load_split(out, "valid", "dict.txt")
    assert 6000 < len(d) < 8000
    with open(os.path.join(out, "tok", "valid.txt"), encoding="utf-8") as f:
        lines = f.read().rstrip("\n").split("\n")
    assert len(valid) == len(lines)
    for i in (0, 1, len(lines) // 2, len(lines) - 1):
        words = re.findall(r"\w+|[^\w\s]", lines[i])
        got = [d[j] for j in valid[i][:-1].tolist()]  # drop </s>
        assert got == [w if d.index(w) != d.unk() else "<unk>" for w in words]
    unk = sum(int((valid[i] == d.unk()).sum()) for i in range(len(valid)))
    total = sum(len(valid[i]) for i in range(len(valid)))
    assert 0.02 < unk / total < 0.1
    p = run_script("prepare-tinyshakespeare.sh", "--words", "--min-count", "3", "--from", src,
                   "--out", out, check=False)
    assert p.returncode != 0 and "other settings" in p.stderr
    p = run_script("prepare-tinyshakespeare.sh", "--words", "--min-count", "0", "--out", out, check=False)
    assert p.returncode != 0 and "--min-count must be a positive integer" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "fwp_data.py"), "make-dict", "--out",
                        str(tmp_path / "d.txt"), "--model", "m.model", "--min-count", "2", os.devnull],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "use one of them" in p.stderr


def test_tinyshakespeare_second_run_is_noop(shakespeare, shared_data):
    out, _ = shakespeare
    p = run_script("prepare-tinyshakespeare.sh", "--out", out,
                   "--from", os.path.join(shared_data, "tinyshakespeare"))
    assert "nothing to do" in p.stdout


# ------------------------------------------------------------------ errors and help

@pytest.mark.parametrize("script", ["prepare-multi30k.sh", "prepare-tinyshakespeare.sh",
                                    "prepare-wmt14-en-de.sh", "prepare-wikitext-103.sh"])
def test_help_and_missing_from_dir(script, tmp_path):
    p = run_script(script, "--help")
    assert "--from" in p.stdout and "--out" in p.stdout
    p = run_script(script, "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "not a directory" in p.stderr


def test_from_dir_without_the_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_script("prepare-multi30k.sh", "--from", str(empty), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode != 0
    assert "has no" in p.stderr and ".gz" in p.stderr


def test_checksum_and_size_mismatch(shared_data, tmp_path):
    with open(os.path.join(shared_data, "tinyshakespeare", "input.txt"), "rb") as f:
        data = f.read()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "input.txt").write_bytes(data[:-1] + b"?")  # same size, other content
    p = run_script("prepare-tinyshakespeare.sh", "--from", str(bad), "--out", str(tmp_path / "o1"), check=False)
    assert p.returncode != 0 and "checksum mismatch" in p.stderr and "sha256" in p.stderr
    (bad / "input.txt").write_bytes(data[:1000])
    p = run_script("prepare-tinyshakespeare.sh", "--from", str(bad), "--out", str(tmp_path / "o2"), check=False)
    assert p.returncode != 0 and "size mismatch" in p.stderr


# ------------------------------------------------------------------ WMT14 on a fake mirror

def _fake_wmt_mirror(shared_data, root):
    """Archives with WMT14's member names, filled with a few Multi30k lines."""
    m = os.path.join(shared_data, "multi30k")
    en, de = gz_lines(os.path.join(m, "train.en.gz")), gz_lines(os.path.join(m, "train.de.gz"))
    ven, vde = gz_lines(os.path.join(m, "val.en.gz")), gz_lines(os.path.join(m, "val.de.gz"))

    def add(tar, name, text):
        b = text.encode("utf-8")
        info = tarfile.TarInfo(name)
        info.size = len(b)
        tar.addfile(info, io.BytesIO(b))

    def sgm(lines):
        return "<srcset>\n" + "".join(f'<seg id="{i}">{s.replace("&", "&amp;")}</seg>\n'
                                      for i, s in enumerate(lines, 1)) + "</srcset>\n"

    train = {
        "training-parallel-europarl-v7.tgz": ("training/europarl-v7.de-en", slice(0, 1500)),
        "training-parallel-commoncrawl.tgz": ("commoncrawl.de-en", slice(1500, 2500)),
        "training-parallel-nc-v9.tgz": ("training/news-commentary-v9.de-en", slice(2500, 3000)),
    }
    for archive, (member, sl) in train.items():
        with tarfile.open(os.path.join(root, archive), "w:gz") as t:
            add(t, member + ".en", "\n".join(en[sl]) + "\n")
            add(t, member + ".de", "\n".join(de[sl]) + "\n")
    with tarfile.open(os.path.join(root, "test.tgz"), "w:gz") as t:
        add(t, "test/newstest2013-src.en.sgm", sgm(ven[:40]))
        add(t, "test/newstest2013-src.de.sgm", sgm(vde[:40]))
    with tarfile.open(os.path.join(root, "test-full.tgz"), "w:gz") as t:
        add(t, "test-full/newstest2014-deen-src.en.sgm", sgm(ven[40:70]))
        add(t, "test-full/newstest2014-deen-ref.de.sgm", sgm(vde[40:70]))
    return ven, vde


def test_wmt14_pipeline_on_fake_mirror(shared_data, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    ven, vde = _fake_wmt_mirror(shared_data, str(mirror))
    out = str(tmp_path / "wmt")
    # The fake archives must fail the real checks ...
    p = run_script("prepare-wmt14-en-de.sh", "--from", str(mirror), "--out", out, check=False)
    assert p.returncode != 0 and "mismatch" in p.stderr
    shutil.rmtree(out)
    # ... and go through the whole pipeline without them.
    run_script("prepare-wmt14-en-de.sh", "--from", str(mirror), "--out", out, "--no-verify",
               "--vocab-size", "600", "--workers", "1", "--spm-sentences", "10000")
    with open(os.path.join(out, "text", "test.de"), encoding="utf-8") as f:
        assert f.read().splitlines() == vde[40:70]
    d, ds = load_split(out, "test.en-de.de", "dict.de.txt")
    assert len(ds) == 30 and sum(int((ds[i] == d.unk()).sum()) for i in range(len(ds))) == 0
    _, tr = load_split(out, "train.en-de.en", "dict.en.txt")
    assert 2500 <= len(tr) <= 3000  # a few lopsided pairs dropped by the length filter
    p = run_script("prepare-wmt14-en-de.sh", "--from", str(mirror), "--out", out, "--no-verify",
                   "--vocab-size", "600", "--workers", "1", "--spm-sentences", "10000")
    assert "nothing to do" in p.stdout
