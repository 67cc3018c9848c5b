"""The GPU worker daemon: wraps an inference engine and serves one worker queue."""
