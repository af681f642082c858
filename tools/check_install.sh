#!/usr/bin/env bash
# `make check-install`: is the README's install true on a fresh machine that reaches nothing but PyPI
# and PyTorch's CPU index? It runs `make install` as such a machine would: no pip configuration (no
# local wheel directory, no extra index), a throwaway pip cache and throwaway venvs, and checks
#  1. with TORCH_INDEX, the install succeeds and torch is the pin of CONSTRAINTS, the CPU build: no
#     nvidia-* or triton package, torch.version.cuda is None;
#  2. without it (TORCH_INDEX=), the install fails on torch: check 1 does not pass by accident;
#  3. each extra alone, from the built wheel (not editable) in a venv of its own: the core imports
#     gpt_spec, [torch] gpt_torch, [flax] gpt_flax, and none loads a framework it does not need;
#  4. the wheel with [parity] runs `gpt-parity check` on the tiny config; its tests are not in it.
# TORCH_WHEELS=/dir stands in for PyTorch's index where it cannot be reached: a local PEP 503 index of
# the torch wheels in /dir is built and passed as TORCH_INDEX=file://...
# Needs the network (everything else is downloaded from PyPI), so it is not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_WHEELS=${TORCH_WHEELS:-}

work=$(mktemp -d "${TMPDIR:-/tmp}/check-install.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A fresh machine's pip: no configuration file, no PIP_* variable (here they add local wheels and indexes).
while IFS= read -r var; do unset "$var"; done < <(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p')
export PIP_CONFIG_FILE=/dev/null PIP_CACHE_DIR="$work/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1
unset MAKEFLAGS MFLAGS MAKELEVEL  # the make commands below take the variables given here, nothing else

if [ -n "$TORCH_WHEELS" ]; then
    index="$work/torch-index"
    mkdir -p "$index/torch"
    echo '<!DOCTYPE html><html><body><a href="torch/">torch</a></body></html>' >"$index/index.html"
    {
        echo '<!DOCTYPE html><html><body>'
        for wheel in "$TORCH_WHEELS"/torch-*.whl; do
            [ -e "$wheel" ] || { echo "no torch-*.whl in $TORCH_WHEELS" >&2; exit 2; }
            name=$(basename "$wheel")
            ln -s "$(realpath "$wheel")" "$index/torch/$name"
            echo "<a href=\"${name//+/%2B}#sha256=$(sha256sum "$wheel" | cut -d' ' -f1)\">$name</a><br/>"
        done
        echo '</body></html>'
    } >"$index/torch/index.html"
    TORCH_INDEX="file://$index"
fi
pin=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$CONSTRAINTS")
[ -n "$pin" ] || { echo "$CONSTRAINTS pins no torch==..." >&2; exit 2; }

install() {  # install VENV TORCH_INDEX LOG
    make --no-print-directory install VENV="$1" PYTHON="$PYTHON" CONSTRAINTS="$CONSTRAINTS" TORCH_INDEX="$2" >"$3" 2>&1
}

echo "check-install: pip without configuration, PyPI and TORCH_INDEX=$TORCH_INDEX"
start=$SECONDS
if install "$work/venv-no-index" "" "$work/no-index.log"; then
    echo "FAIL: make install TORCH_INDEX= succeeded with PyPI alone: this check cannot tell" >&2
    exit 1
fi
# Why, in pip's words for torch alone (the make log, --quiet, says only "ResolutionImpossible"):
if "$work/venv-no-index/bin/python" -m pip install --dry-run --no-deps "torch==$pin" \
        >"$work/why.log" 2>&1 || ! grep -q "torch==$pin" "$work/why.log"; then
    cat "$work/no-index.log" "$work/why.log" >&2
    echo "FAIL: make install TORCH_INDEX= failed, but PyPI alone is not short of torch==$pin" >&2
    exit 1
fi
echo "ok: without TORCH_INDEX, make install fails ($((SECONDS - start)) s); pip on torch alone:"
grep -E "^ERROR: No matching" "$work/why.log" | sed 's/^/    /'

start=$SECONDS
if ! install "$work/venv" "$TORCH_INDEX" "$work/index.log"; then
    cat "$work/index.log" >&2
    echo "FAIL: make install TORCH_INDEX=$TORCH_INDEX failed" >&2
    exit 1
fi
"$work/venv/bin/python" - "$pin" "$((SECONDS - start))" <<'EOF'
import importlib.metadata as md
import sys

import torch

pin, seconds = sys.argv[1:]
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
cuda = [n for n in names if n.startswith(("nvidia-", "nvidia_", "triton", "cuda-"))]
problems = []
if torch.__version__ != pin:
    problems.append(f"torch is {torch.__version__}, constraints pin {pin}")
if torch.version.cuda is not None:
    problems.append(f"torch is built for CUDA {torch.version.cuda}")
if cuda:
    problems.append(f"CUDA packages installed: {', '.join(cuda)}")
for problem in problems:
    print("FAIL:", problem, file=sys.stderr)
if problems:
    sys.exit(1)
print(f"ok: with TORCH_INDEX, installed in {seconds} s: {len(names)} packages, torch {torch.__version__}"
      " (torch.version.cuda None), no nvidia-*/triton package")
EOF

# 3 and 4: the wheel, as a user installs it.
start=$SECONDS
"$work/venv/bin/python" -m pip wheel --quiet --no-deps -w "$work/dist" . >"$work/wheel.log" 2>&1 \
    || { cat "$work/wheel.log" >&2; echo "FAIL: the wheel does not build" >&2; exit 1; }
wheel=$(ls "$work"/dist/gpt_twins-*.whl)
if unzip -Z1 "$wheel" | grep -Eq '^tests/|(^|/)test_[^/]*\.py$'; then
    echo "FAIL: the wheel holds tests" >&2
    exit 1
fi
extra_alone() {  # extra_alone EXTRA PACKAGE FRAMEWORKS-IT-MUST-NOT-LOAD
    local venv="$work/venv-$1" spec="$wheel${1:+[$1]}"
    "$PYTHON" -m venv "$venv"
    local index=()
    [ "$1" = torch ] || [ "$1" = parity ] && index=(--extra-index-url "$TORCH_INDEX")
    if ! "$venv/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "${index[@]}" "$spec" >"$work/$1.log" 2>&1; then
        cat "$work/$1.log" >&2
        echo "FAIL: pip install '$spec' failed" >&2
        exit 1
    fi
    "$venv/bin/python" -c "
import importlib, sys
importlib.import_module('$2')
loaded = [m for m in '$3'.split() if m in sys.modules]
assert not loaded, f'$2 loaded {loaded}'
" || { echo "FAIL: $2 alone from '$spec'" >&2; exit 1; }
}
extra_alone "" gpt_spec "torch jax flax"
extra_alone torch gpt_torch "jax flax"
extra_alone flax gpt_flax "torch"
echo "ok: the core, [torch] and [flax] each install alone from the wheel and import their package"
extra_alone parity parity_tests ""
"$work/venv-parity/bin/gpt-parity" check --config examples/tiny-odd.json --quiet >"$work/check.log" 2>&1 \
    || { cat "$work/check.log" >&2; echo "FAIL: gpt-parity check from the wheel" >&2; exit 1; }
tail -1 "$work/check.log" | grep -qx PASS || { cat "$work/check.log" >&2; echo "FAIL: no PASS" >&2; exit 1; }
echo "ok: the wheel with [parity] runs gpt-parity check on the tiny config: PASS ($((SECONDS - start)) s)"
