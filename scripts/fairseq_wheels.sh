# Sourced by the GPU scripts (run from the repository root, with PY set): where $PY cannot
# import fairseq, install the carried wheels in .whl/ (ve-fairseq, hydra-core, omegaconf,
# antlr4-python3-runtime, bitarray; see fetch_gpu_wheels.sh) into /tmp/fsite and put it on
# PYTHONPATH and PATH.
if ! "$PY" -c "import fairseq" 2>/dev/null && compgen -G ".whl/ve_fairseq-*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fsite \
    .whl/ve_fairseq-*.whl .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl \
    .whl/bitarray-*.whl
  export PYTHONPATH="/tmp/fsite${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/fsite/bin:$PATH"
fi
