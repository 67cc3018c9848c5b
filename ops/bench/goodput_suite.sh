#!/usr/bin/env bash
# The goodput results in the README: every trace under its standard SLO preset and under
# `interactive`, and the homogeneous cluster, 3 seeds x 2,000 requests each, virtual replay.
#   bash ops/bench/goodput_suite.sh TRACES_DIR OUT_DIR [PART] [JOBS]
# TRACES_DIR holds the full public traces (../shared/traces); PART picks a share of the runs
# (1 = the four standard presets + homogeneous, 2 = the four interactive runs, all = both), run
# side by side with JOBS worker processes each (default 3). On the lent GPU machine's 16 cores
# the two parts took about 7 and 6 minutes; on 2 cores, about an hour. PYTHON picks the interpreter
# (default python3); -P keeps a checkout's dio/ folder from shadowing the installed package.
set -uo pipefail
traces=${1:?traces dir}; out=${2:?out dir}; part=${3:-all}; jobs=${4:-3}
mkdir -p "$out"
cluster=H100:1,A100-40GB:2,L4:2,T4:3
conv=$traces/azure_2023/AzureLLMInferenceTrace_conv.csv
code=$traces/azure_2023/AzureLLMInferenceTrace_code.csv
arxiv=$traces/length_only/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv
mooncake=$traces/mooncake/synthetic_trace.jsonl
run() {  # NAME TRACE CLUSTER [options]
  local name=$1 trace=$2 on=$3; shift 3
  "${PYTHON:-python3}" -P -m dio.ops.cli bench goodput --trace "$trace" --cluster "$on" --seeds 3 --max-requests 2000 \
    --jobs "$jobs" --out "$out" --name "$name" --json "$@" > "$out/$name.log" 2>&1
  echo "$name: rc=$? $(tail -c 300 "$out/$name.log" | tr -d '\n' | cut -c1-200)"
}
if [ "$part" = 1 ] || [ "$part" = all ]; then
  run goodput-azure-conv-chat "$conv" $cluster &
  run goodput-azure-code-chat "$code" $cluster &
  run goodput-arxiv-summarization "$arxiv" $cluster &
  run goodput-mooncake-long-context "$mooncake" $cluster &
  run goodput-azure-conv-chat-homogeneous "$conv" A100-80GB:8 &
  wait
fi
if [ "$part" = 2 ] || [ "$part" = all ]; then
  for t in conv code arxiv mooncake; do
    run "goodput-$(case $t in conv) echo azure-conv;; code) echo azure-code;; *) echo $t;; esac)-interactive" "${!t}" $cluster --slo interactive &
  done
  wait
fi
