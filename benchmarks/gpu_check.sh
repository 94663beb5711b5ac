#!/usr/bin/env bash
# Issue 21's checks on a lent NVIDIA H100/H200, sized for device calls of a few minutes each. Every stage has a time
# limit inside the call's budget; what each prints goes to OUT/<stage>.log (at most 8 files come back from a call).
#
#   bash benchmarks/gpu_check.sh ratio OUT [SECONDS]     # ResNet-56, bs 256, 15 epochs, CUDA graphs: minifast against
#                                                        # the hand-written loop, with minifast's diagnostic variants
#                                                        # and a profile of each runner (about 6 minutes on an H200)
#   bash benchmarks/gpu_check.sh bigbatch OUT [SECONDS]  # minifast alone at bs 512 and 1024 (lr x sqrt of the batch
#                                                        # ratio): the 15-epochs-in-15-s target (about 3 minutes)
#   bash benchmarks/gpu_check.sh smith OUT [SECONDS]     # the CUDA tests, then `minifast smith --compile` with
#                                                        # ResNet-56 on a CIFAR-sized generated set (SMITH_FLAGS=
#                                                        # replaces --compile; eagerly it took 334 s on an H200)
#
# Needs fastprogress: with no package index there, carry its wheel and put it on PYTHONPATH first.
set -u
what=${1:?give ratio, bigbatch or smith}; OUT=${2:?give an output folder}; BUDGET=${3:-400}
mkdir -p "$OUT"
start=$SECONDS
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

left() { echo $((BUDGET - (SECONDS - start))); }

stage() {  # stage NAME LIMIT COMMAND...: run COMMAND with LIMIT seconds (or what is left), appending to OUT/NAME.log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    local l
    l=$(left)
    ((limit > l)) && limit=$l
    if ((limit < 15)); then
        echo "== $name: skipped, $l s left" | tee -a "$OUT/$name.log"
        return
    fi
    echo "== $name (limit $limit s): $*" | tee -a "$OUT/$name.log"
    timeout -k 5 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
}

echo "date $(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
$py -c "import torch, torchvision, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision',
torchvision.__version__, 'python', sys.version.split()[0], 'gpu', torch.cuda.get_device_name())"

run_ratio() {
    stage ratio 420 $py benchmarks/gpu_resnet56.py --compile --compile-mode reduce-overhead --baseline-epochs 0 \
        --variants no-guard,one-group,no-pred --json "$OUT/ratio.json" --profile "$OUT/profile.txt"
    grep -E '^ +round|accuracy by epoch|RESULT|^minifast|^hand-written' "$OUT/ratio.log"
}

run_bigbatch() {
    for cfg in '512 1.4e-2' '1024 2e-2'; do
        set -- $cfg
        stage bigbatch 110 $py benchmarks/gpu_resnet56.py --compile --compile-mode reduce-overhead --baseline-epochs 0 \
            --runners minifast --bs "$1" --max-lr "$2"
    done
    grep -E '^ +round|accuracy by epoch|RESULT' "$OUT/bigbatch.log"
}

case $what in
ratio) run_ratio ;;
bigbatch) run_bigbatch ;;
smith)
    stage tests 150 $py -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_augment.py \
        tests/test_fastpath.py tests/test_mixup.py
    tail -n 3 "$OUT/tests.log"
    stage smith 9999 $py -m minifast smith --arch resnet56 --n-train 50000 --n-valid 10000 --bs 256 --epochs 15 \
        --quiet --out /tmp/smith_run ${SMITH_FLAGS---compile}
    grep -E '^smith:' "$OUT/smith.log"
    cp /tmp/smith_run/report.md "$OUT/smith_report.md" 2>/dev/null
    ;;
*)
    echo "unknown check $what (give ratio, bigbatch or smith)" >&2
    exit 2
    ;;
esac
echo "== $what done in $((SECONDS - start)) s"
