# The start both GPU scripts share (sourced): OUT (from $1, $OUT or the caller's default) made,
# offline and unbuffered, PY, a refusal without CUDA, and the device recorded.
# Usage inside a script: source "$(dirname "$0")/gpu-env.sh" NAME DEFAULT_OUT "$@"
set -o pipefail
_name=$1 _default=$2
shift 2
OUT=${1:-${OUT:-$_default}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "$_name: needs a CUDA device (the 7B shape would not fit a CPU run)" >&2
    exit 1
fi
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
B="$PY -m lav2cli bench"
