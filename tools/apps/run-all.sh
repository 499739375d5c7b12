#!/usr/bin/env bash
# Runs every app scenario against one server URL (normally proxy.mjs in front of cfg-textgen serve)
# and prints a one-line summary per scenario; details in $SHOTS/<name>.json and the PNGs beside it.
#
# usage: tools/apps/run-all.sh SERVER_URL [ST_URL] [LITE_URL] [SHOTS_DIR]
#   e.g. tools/apps/run-all.sh http://127.0.0.1:5152 http://127.0.0.1:8123 http://127.0.0.1:8124/klite.html /work/apps/shots
# ONLY="st-ooba lite-story-sse" runs just those scenarios; TOKENS=20 CONTEXT=1024 for a slow CPU.
set -u
here=$(cd "$(dirname "$0")" && pwd)
server=${1:?SERVER_URL}
st=${2:-http://127.0.0.1:8123}
lite=${3:-http://127.0.0.1:8124/klite.html}
shots=${4:-/work/apps/shots}
mkdir -p "$shots"

run() { # name, driver, args...
    local name=$1 driver=$2; shift 2
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
    echo "== $name"
    node "$here/$driver" --server "$server" --shots "$shots" --name "$name" --tokens "${TOKENS:-60}" "$@" > "$shots/$name.log" 2>&1
    grep -E '^(connect|reply|story|toasts|message box|DRIVER ERROR|logprobs panel)' "$shots/$name.log" | cut -c1-240
}

run st-ooba                sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type ooba
run st-ooba-stream         sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type ooba --stream
run st-ooba-stream-logprobs sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type ooba --stream --logprobs
run st-ooba-logprobs       sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type ooba --logprobs
run st-koboldcpp           sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type koboldcpp
run st-koboldcpp-stream    sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type koboldcpp --stream
run st-koboldcpp-stream-logprobs sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type koboldcpp --stream --logprobs
run st-llamacpp            sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type llamacpp
run st-llamacpp-stream-logprobs sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type llamacpp --stream --logprobs
run st-tabby               sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type tabby
run st-tabby-stream        sillytavern.mjs --context "${CONTEXT:-2048}" --st "$st" --type tabby --stream
run lite-story-sse         kobold-lite.mjs --lite "$lite" --mode story --stream sse
run lite-story-poll        kobold-lite.mjs --lite "$lite" --mode story --stream poll
run lite-story-off         kobold-lite.mjs --lite "$lite" --mode story --stream off
run lite-instruct-sse      kobold-lite.mjs --lite "$lite" --mode instruct --stream sse
run lite-story-sse-abort   kobold-lite.mjs --lite "$lite" --mode story --stream sse --abort
run lite-story-poll-abort  kobold-lite.mjs --lite "$lite" --mode story --stream poll --abort
