"""Generation without Ray: sampling, KV block accounting, tokenization, scheduling, the driver."""
