#!/usr/bin/env bash
# dio gateway with curl: the models, a completion, a chat, a stream (SSE), an error.
#   dio up &        # then: bash examples/curl.sh   (GATEWAY=http://host:port to point elsewhere)
set -euo pipefail
GATEWAY=${GATEWAY:-http://127.0.0.1:8000}
AUTH=(-H "Authorization: Bearer ${OPENAI_API_KEY:-none}")  # needed when the gateway has DIO_API_KEYS

curl -s "${AUTH[@]}" "$GATEWAY/v1/models"; echo
MODEL=$(curl -s "${AUTH[@]}" "$GATEWAY/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

curl -s "${AUTH[@]}" "$GATEWAY/v1/completions" -H 'content-type: application/json' \
     -d "{\"model\": \"$MODEL\", \"prompt\": \"Hello\", \"max_tokens\": 16}"; echo

curl -s "${AUTH[@]}" "$GATEWAY/v1/chat/completions" -H 'content-type: application/json' \
     -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 16,
          \"deadline_ms\": 30000, \"tier\": \"interactive\"}"; echo

# -N: print each server-sent event as it arrives; the stream ends with "data: [DONE]".
curl -sN "${AUTH[@]}" "$GATEWAY/v1/chat/completions" -H 'content-type: application/json' \
     -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Count to five\"}],
          \"max_tokens\": 16, \"stream\": true, \"stream_options\": {\"include_usage\": true}}"

# An error, in OpenAI's shape (-i shows the status line).
curl -si "${AUTH[@]}" "$GATEWAY/v1/chat/completions" -H 'content-type: application/json' \
     -d '{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}'; echo
