#!/usr/bin/env bash
# Every GPU measurement benchmarks/RESULTS.md reports for the full-size synthetic run, in order,
# each part's JSON into OUT_DIR (named by part and commit):
#
#   bash benchmarks/gpu_suite.sh OUT_DIR WRN50_WEIGHTS [OFFICIAL_SRC] [PART ...]
#
# WRN50_WEIGHTS: a wide_resnet50_2 state dict (random weights serve for timing: it does not depend
# on the values). PART: patchcore (exact, as the paper), levers (--coreset-precision fp16 and
# --knn-index flat-fp16), candidates (--coreset-order candidates, exact, and --knn-index
# flat-fp16), spade (k=50), padim -- each cold then warm --; figures (the candidates part's
# settings without figures, then with 8 drawing processes: what the figures cost the run's end);
# coreset; fill, read and
# official (these three read the synthetic data the others generate; official needs OFFICIAL_SRC,
# the src folder of a patchcore-inspection checkout); accuracy (the approximations against the
# exact path on real bottle with MobileNetV2, 1 % and 10 %, seeds 0-2: --coreset-precision fp16 and
# --knn-index flat-fp16 in one sweep, --coreset-order candidates in another, whose metrics are the
# first sweep's fp32 ones up to float32 ties in the greedy (benchmarks/RESULTS.md); BOTTLE_ROOT
# holds bottle/, default ../shared/mvtec; MOBILENET_WEIGHTS, default
# ../shared/weights/mobilenet_v2_imagenet_features.pth; for a copy made by
# `python -m datasets.crop_copy`, BOTTLE_RESIZE=224); report (benchmarks/suite_report.py: the tables
# RESULTS.md takes from every JSON in OUT_DIR, targets marked met or not, into report_<commit>.md).
# Default: all, one after another.
# DEVICE=cpu runs the same commands on a CPU (slowly: to check the script itself). A smaller
# check before a GPU run: CATEGORIES (the synthetic parts' and fill's, default all 15),
# CATEGORY (read's and official's, default hazelnut) and CORESET_SIZES (default the full
# run's), e.g. DEVICE=cpu CATEGORIES=bottle CATEGORY=bottle CORESET_SIZES=5000.
set -euo pipefail
out=${1:?OUT_DIR}; weights=${2:?WRN50_WEIGHTS}; official_src=${3:-}
shift $(( $# < 3 ? $# : 3 ))
all="patchcore levers candidates spade padim figures coreset fill read official accuracy report"
parts=${*:-$all}
here=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$out"
bench() { python "$here/benchmarks/benchmark.py" "$@"; }
device=${DEVICE:-cuda}
common=(--backbone wide_resnet50_2 --weights "$weights" --device "$device" --coreset 0.1)
all15="bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush
       transistor wood zipper"
categories=(${CATEGORIES:-$all15}); category=${CATEGORY:-hazelnut}
synthetic=(synthetic "${common[@]}" --categories "${categories[@]}")
for part in $parts; do
  echo "== $part"
  case $part in
    patchcore) bench "${synthetic[@]}" --runs 2 --json "$out/synthetic_patchcore_$commit.json" ;;
    levers) bench "${synthetic[@]}" --runs 2 --set coreset_precision=fp16 knn_index=flat-fp16 \
              --work-dir /tmp/anomaly_benchmark_levers --json "$out/synthetic_levers_$commit.json" ;;
    candidates) bench "${synthetic[@]}" --runs 2 --set coreset_order=candidates knn_index=flat-fp16 \
                  --work-dir /tmp/anomaly_benchmark_candidates \
                  --json "$out/synthetic_candidates_$commit.json" ;;
    figures) for plots in "--plots 0" "--plot-workers 8"; do
               name=$(echo "$plots" | tr -d ' -')
               bench "${synthetic[@]}" --runs 2 --set coreset_order=candidates \
                 knn_index=flat-fp16 $plots --work-dir /tmp/anomaly_benchmark_figures \
                 --json "$out/synthetic_figures_${name}_$commit.json"
             done ;;
    spade) bench "${synthetic[@]}" --method spade --set k=50 --runs 2 \
             --work-dir /tmp/anomaly_benchmark_spade --json "$out/synthetic_spade_$commit.json" ;;
    padim) bench "${synthetic[@]}" --method padim --runs 2 \
             --work-dir /tmp/anomaly_benchmark_padim --json "$out/synthetic_padim_$commit.json" ;;
    coreset) bench coreset --device "$device" --sizes ${CORESET_SIZES:-50000 163856 306544} --coreset 0.1 \
               --json "$out/coreset_$commit.json" ;;
    fill) bench fill --device "$device" --data-root /tmp/mvtec_synthetic \
            --categories "${categories[@]}" \
            --json "$out/fill_$commit.json" ;;
    read) bench read --device "$device" --data-root /tmp/mvtec_synthetic --category "$category" \
            --json "$out/read_$commit.json" ;;
    official) [ -n "$official_src" ] || { echo "official: give OFFICIAL_SRC"; exit 2; }
              python "$here/benchmarks/official.py" --official-src "$official_src" \
                --backbone wide_resnet50_2 --weights "$weights" --coreset 0.1 --device "$device" \
                --data-root /tmp/mvtec_synthetic --category "$category" \
                --json "$out/official_${category}_$commit.json" ;;
    accuracy) bottle=(python "$here/main.py" --backbone mobilenet_v2 --categories bottle
                      --weights "${MOBILENET_WEIGHTS:-$here/../shared/weights/mobilenet_v2_imagenet_features.pth}"
                      --data-root "${BOTTLE_ROOT:-$here/../shared/mvtec}" --no-download
                      --resize "${BOTTLE_RESIZE:-256}" --crop 224 --device "$device" --plots 0
                      --no-progress --cache-dir /tmp/anomaly_accuracy_cache --coreset 0.01 0.1
                      --seeds 0 1 2)
              rm -rf /tmp/anomaly_accuracy
              "${bottle[@]}" --coreset-precision fp32 fp16 --knn-index flat flat-fp16 \
                --result-dir /tmp/anomaly_accuracy/levers
              "${bottle[@]}" --coreset-order candidates --result-dir /tmp/anomaly_accuracy/candidates
              cp /tmp/anomaly_accuracy/levers/summary.json "$out/accuracy_levers_$commit.json"
              cp /tmp/anomaly_accuracy/candidates/summary.json "$out/accuracy_candidates_$commit.json" ;;
    report) python "$here/benchmarks/suite_report.py" "$out" | tee "$out/report_$commit.md" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
