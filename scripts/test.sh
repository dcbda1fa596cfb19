#!/usr/bin/env bash
# Install the project with its dev extra into the active Python environment, then run the tests.
# torch/torchvision are pinned to the builds this project is tested with (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
set +e
# the slowest tests are listed at the end: the suite has a time budget (about 25 min on 2 cores)
python -m pytest -q --durations=20 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure of the suite, say so
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
