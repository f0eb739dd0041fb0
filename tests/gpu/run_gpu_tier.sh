#!/usr/bin/env bash
# The whole GPU tier in one command, for the accelerator machine (it must end within 8 minutes):
#   bash tests/gpu/run_gpu_tier.sh [pytest args]
# The machine brings its own CUDA torch; distrib is put on the path from this checkout without installing
# its pinned CPU torch. Every test prints its outcome and the skip reasons (-rs), and the log is kept
# under $OUT when that variable is set.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
log="${OUT:-/tmp}/gpu_tier.log"
per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 240")
timeout 460 python -m pytest tests/gpu -p no:cacheprovider -rs -v $per_test "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
