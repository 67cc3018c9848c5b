"""Defaults shared by every process, each with its unit in the name."""

HEARTBEAT_INTERVAL_S = 0.5  # a worker refreshes telemetry and its alive key this often
HEARTBEAT_TTL_S = 3.0  # a worker whose alive key expired is dead; its queue is taken back
JOB_TTL_S = 24 * 3600  # a terminal job hash expires this long after it finished
REPLY_STREAM_TTL_S = 3600  # a client's reply stream expires when idle this long
REPLY_STREAM_MAXLEN = 100_000  # approximate cap of one client's unread notices
COMPLETIONS_MAXLEN = 1_000_000  # safety cap when no dispatcher consumes completions
TOKEN_STREAM_MAXLEN = 10_000  # approximate cap of one job's token stream, in entries (about one per flush)
TOKEN_STREAM_TTL_S = 600  # a token stream expires this long after its last write while its job runs...
TOKEN_STREAM_END_TTL_S = 60  # ...and this long after its end (a client that read it deletes it at once)
LEASE_TTL_MS = 3000  # a dispatcher that stops renewing its lease loses it after this long
MAX_ATTEMPTS = 3  # a job whose worker died this many times ends failed
REJECT_RETRY_AFTER_S = 1.0  # retry-after hint for requests shed under overload
REDIS_RETRY_MIN_S = 0.05  # after a failed Redis call a process waits this long, doubling per failure...
REDIS_RETRY_MAX_S = 2.0  # ...up to this (each wait jittered down by up to half), until Redis answers

# Size limits on what a client controls.
MAX_PROMPT_CHARS = 2_000_000
MAX_PROMPT_TOKENS = 262_144
MAX_OUTPUT_TOKENS = 65_536
MAX_PREFIX_HASHES = 4096
MAX_ID_CHARS = 128
MAX_MODEL_CHARS = 256
MAX_METADATA_ITEMS = 16
MAX_METADATA_CHARS = 512
MAX_SLO_MS = 7 * 24 * 3600 * 1000  # deadlines and per-token SLOs: a week at most
MAX_STOP_SEQUENCES = 4  # a request's stop sequences at most (OpenAI's bound)...
MAX_STOP_CHARS = 256  # ...each this long at most
MAX_CHAT_TEMPLATE_CHARS = 32_768  # a worker registers a longer chat template as none (the gateway falls back)
MAX_SPECIAL_TOKEN_CHARS = 64  # the eos_token text registered beside it

# Model and prompt conventions every component shares.
DEFAULT_MODEL = "llama-3.2-3b"  # the model shape a simulated worker serves unless told otherwise
CHARS_PER_TOKEN = 4  # a text prompt whose token count is unknown counts ceil(characters / 4) tokens
PREFIX_BLOCK_TOKENS = 512  # prompt tokens one prefix-cache block hash names (as Mooncake's hash_ids)
