"""Page arithmetic of the KV pool, shared by the config's capacity checks and the cache (no
torch: the config imports it before anything is built)."""


def pages_for(tokens: int, page_size: int) -> int:
    """Pages of `page_size` tokens that hold `tokens` tokens."""
    return -(-tokens // page_size)
