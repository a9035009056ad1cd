"""The public functions of fwp_fairseq.ops: typed, documented with Args / Returns / Example, and
every Example runs."""
import doctest
import inspect

import pytest
import torch

import fwp_fairseq.ops as ops

PUBLIC = [n for n in ops.__all__ if callable(getattr(ops, n))]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_function_is_typed_and_documented(name):
    obj = getattr(ops, name)
    doc = obj.__doc__ or ""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters if p != "self"]
    assert "Example:" in doc and ("Args:" in doc or not params), name
    untyped = [p for p in params if sig.parameters[p].annotation is inspect.Parameter.empty]
    assert not untyped, (name, untyped)
    if not inspect.isclass(obj):
        assert "Returns:" in doc and sig.return_annotation is not inspect.Signature.empty, name


@pytest.mark.parametrize("name", PUBLIC)
def test_examples_run(name):
    torch.manual_seed(0)
    globs = {"torch": torch, **{n: getattr(ops, n) for n in ops.__all__}}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder(recurse=False).find(getattr(ops, name), name, globs=globs):
        runner.run(test)
    assert runner.failures == 0, name
